"""The micro-batch: one packed row as this rank's model, loss and pipeline schedule consume it.

``qwen3vl.parallel.context_parallel.model_inputs`` cuts a ``PackedBatch`` (data's contract) for one
context-parallel rank into a ``MicroBatch``. Three readers share it, each through one method:

* the model: ``model_kwargs()``, exactly the arguments of ``Qwen3VLModel.forward``;
* the loss (``qwen3vl.train.step``): ``loss_mask()`` and ``loss_token_counts``;
* megatron's pipeline schedules: ``schedule_seq_length``, the one place that knows which length they
  want (see there).

``build_packed_seq_params`` lives here too: it is the packed-row half of the contract with megatron
(``PackedSeqParams``), used for the LLM's rows and for the ViT's frame groups alike.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from qwen3vl.data.batch import IGNORE_INDEX


def build_packed_seq_params(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor | None = None,
                            max_seqlen: int | None = None) -> PackedSeqParams:
    """megatron ``PackedSeqParams`` for one packed row (int32 cumulative lengths; ``max_seqlen`` a Python int,
    by default the longest padded segment). Under context parallelism pass the *global* cu_seqlens."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    cu_seqlens_padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded.to(torch.int32)
    if max_seqlen is None:
        lengths = cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def _moved(value: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, PackedSeqParams):  # cu_seqlens tensors move, max_seqlen ints stay
        return replace(value, **{f.name: _moved(getattr(value, f.name), device, non_blocking)
                                 for f in fields(value) if f.init})
    return value


@dataclass
class MicroBatch:
    """This CP rank's share of one packed row (``T_local = T / cp`` rows; see ``model_inputs``)."""

    input_ids: torch.Tensor  # [T_local] token ids
    position_ids: torch.Tensor  # [3, T_local] MRoPE rows (t, h, w)
    labels: torch.Tensor  # [T_local] shifted targets, IGNORE_INDEX where there is no loss
    loss_token_counts: torch.Tensor  # [T_local] n_i of the sample owning each row (the loss weight's n)
    visual_index: torch.Tensor  # [T_local] ordinal of each visual token in the *whole* row, -1 for text
    gather_index: torch.Tensor  # [T_local] the global row of each local row
    packed_seq_params: PackedSeqParams  # the whole row's cu_seqlens (global, as transformer-engine wants)
    pixel_values: torch.Tensor  # [N, patch_dim] the whole row's media (split over CP inside the model)
    grid_thw: torch.Tensor  # [M, 3] the whole row's media grids
    row_length: int  # T: the whole packed row, over every CP rank

    @property
    def schedule_seq_length(self) -> int:
        """The ``seq_length`` to give megatron-core's forward/backward schedules for this micro-batch.

        The schedules size the tensors sent between pipeline stages from it, and megatron-core 0.16.1
        (``pipeline_parallel/schedules.py::get_tensor_shapes``) divides it by the CP size itself, and by
        the TP size under sequence parallelism. So it is the whole row's length, never the local one.
        """
        return self.row_length

    def loss_mask(self) -> torch.Tensor:
        """[T_local] bool: rows that have a target."""
        return self.labels != IGNORE_INDEX

    def model_kwargs(self, with_labels: bool = True) -> dict[str, Any]:
        """The keyword arguments of ``Qwen3VLModel.forward``; without labels it returns logits."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    packed_seq_params=self.packed_seq_params, pixel_values=self.pixel_values,
                    grid_thw=self.grid_thw, visual_index=self.visual_index,
                    labels=self.labels if with_labels else None, gather_index=self.gather_index)

    def to(self, device: torch.device | str, non_blocking: bool = False, media: bool = True) -> "MicroBatch":
        """A copy with every tensor (the packed-sequence lengths included) on ``device``. ``media=False``
        leaves ``pixel_values`` where they are (the host, pinned by the loader on a GPU machine): the
        model moves a row's pixels, or this CP rank's share of them, when its vision tower runs. A step
        moves all its micro-batches at once, and their pixels are most of their bytes (a 32K row at half
        visual tokens: 400 MB of float32), so on the device they would hold gigabytes through the step."""
        device = torch.device(device)
        return replace(self, **{f.name: _moved(getattr(self, f.name), device, non_blocking)
                                for f in fields(self) if media or f.name != "pixel_values"})
