"""Which local rows of a packed row are padding (alignment padding and the empty tail segment).

MoE routers use it so padding tokens do not count in the load-balancing loss (megatron's
``padding_mask``: True = padding, shape [batch = 1, local sequence]).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams


def real_rows(packed_seq_params: PackedSeqParams) -> torch.Tensor:
    """[T] bool over the *global* row: True at real tokens."""
    cu = packed_seq_params.cu_seqlens_q.long()
    cu_padded = packed_seq_params.cu_seqlens_q_padded
    cu_padded = cu if cu_padded is None else cu_padded.long()
    padded = cu_padded[1:] - cu_padded[:-1]
    segment = torch.repeat_interleave(torch.arange(padded.numel(), device=cu.device), padded)
    offset = torch.arange(int(cu_padded[-1]), device=cu.device) - cu_padded[:-1][segment]
    return offset < (cu[1:] - cu[:-1])[segment]


def moe_padding_mask(packed_seq_params: PackedSeqParams, local_rows: int, gather_index: torch.Tensor | None,
                     sequence_parallel: bool) -> torch.Tensor:
    """[1, rows] bool, True at padding, for the rows this rank's MoE layers see.

    ``gather_index`` maps local rows to global ones (context parallelism; ``model_inputs`` provides it);
    under sequence parallelism the MoE input is this TP rank's contiguous slice of the local rows.
    """
    real = real_rows(packed_seq_params)
    if gather_index is None:
        if real.numel() != local_rows:
            raise ValueError(f"packed_seq_params describe {real.numel()} rows but the input has {local_rows}: "
                             "pass gather_index (qwen3vl.parallel.context_parallel.model_inputs gives it)")
        padding = ~real
    else:
        padding = ~real[gather_index.to(real.device)]
    if sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        padding = padding.chunk(tp)[parallel_state.get_tensor_model_parallel_rank()]
    return padding.unsqueeze(0)
