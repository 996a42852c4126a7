"""The packed batch: the one contract between the data pipeline, the model and the training loop.

One ``PackedBatch`` is one packed row of ``seq_length`` tokens holding several samples (THD layout,
micro-batch size 1). Each sample occupies a *segment* of the row: its real tokens followed by its
alignment padding (to a multiple of ``pad_multiple`` = 2·CP, ×TP with sequence parallelism, so that
context parallelism can cut every segment into 2·CP equal chunks). If the samples do not fill the row,
the tail is one more segment with no real tokens (real length 0). Hence, for segment ``i``:

    real length    = cu_seqlens[i + 1] - cu_seqlens[i]
    padded length  = cu_seqlens_padded[i + 1] - cu_seqlens_padded[i]   (a multiple of pad_multiple)
    row positions  = [cu_seqlens_padded[i], cu_seqlens_padded[i] + real length)  hold real tokens

and ``cu_seqlens_padded[-1] == seq_length``. Attention is causal within a segment's real tokens and
never crosses segments; padding keys are never attended to.

Labels are already shifted *within each sample* (``labels[p]`` is the token to predict at row
position ``p``; the last token of a sample predicts nothing), so no target ever crosses a sample
boundary. ``IGNORE_INDEX`` marks positions without loss (vision pads, special tokens, prompts,
padding).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100
# mm_token_type_ids values, as transformers' Qwen3-VL processor emits them.
TEXT, IMAGE, VIDEO = 0, 1, 2
# One Conv3d patch flattened as (C, T, Ph, Pw) = 3 * 2 * 16 * 16.
PATCH_DIM = 1536


@dataclass(frozen=True)
class SampleOrigin:
    """Where one packed sample came from, for the data trace: ``id`` is ``"<shard>:<key>"``; ``chunk``
    numbers the pieces of a text document longer than a row."""

    id: str
    dataset: str
    epoch: int
    tokens: int
    chunk: int = 0

    def as_dict(self) -> dict:
        return {"id": self.id, "dataset": self.dataset, "epoch": self.epoch, "tokens": self.tokens,
                "chunk": self.chunk}


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [T] int64 token ids, T = seq_length
    labels: torch.Tensor  # [T] int64 shifted targets, IGNORE_INDEX where there is no loss
    position_ids: torch.Tensor  # [3, T] int64 MRoPE rows (t, h, w), restarting at 0 per sample
    mm_token_type_ids: torch.Tensor  # [T] int64: TEXT, IMAGE or VIDEO per position
    cu_seqlens: torch.Tensor  # [S + 1] int32 cumulative real lengths of the S segments
    cu_seqlens_padded: torch.Tensor  # [S + 1] int32 cumulative padded lengths; [-1] == T
    sample_loss_tokens: torch.Tensor  # [S] int64 n_i: loss tokens of each segment's whole sample
    pixel_values: torch.Tensor  # [N_patches, PATCH_DIM] float, images and videos in row order
    grid_thw: torch.Tensor  # [M, 3] int64 (t, h, w) in patches, one row per image/video, row order
    pad_multiple: int = 1
    samples: tuple[SampleOrigin, ...] = ()  # one per packed sample, in row order (empty outside the loader)

    # --- derived views -------------------------------------------------------------------------
    @property
    def seq_length(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def visual_mask(self) -> torch.Tensor:
        """[T] bool: positions that hold image or video pad tokens (where vision features go)."""
        return self.mm_token_type_ids != TEXT

    def segment_ids(self) -> torch.Tensor:
        """[T] int64: the segment each row position belongs to (padding included)."""
        padded_lengths = (self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.num_segments), padded_lengths)

    def real_token_mask(self) -> torch.Tensor:
        """[T] bool: True at real tokens, False at alignment and tail padding."""
        seg = self.segment_ids()
        offset = torch.arange(self.seq_length) - self.cu_seqlens_padded[:-1].long()[seg]
        real_lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return offset < real_lengths[seg]

    def token_sample_loss_tokens(self) -> torch.Tensor:
        """[T] int64: n_i of the sample that owns each position (the sqrt-loss weight is n_i^-1/2)."""
        return self.sample_loss_tokens[self.segment_ids()]

    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    # --- plumbing --------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {
            f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                     else getattr(self, f.name))
            for f in fields(self)
        }
        return replace(self, **moved)

    def pin_memory(self) -> "PackedBatch":
        """The same row in page-locked memory (for an asynchronous copy to the GPU)."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def validate(self) -> None:
        """Checks the invariants above; raises ValueError naming the broken one."""
        T = self.seq_length
        for name in ("labels", "mm_token_type_ids"):
            if getattr(self, name).shape != (T,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({T},)")
        if self.position_ids.shape != (3, T):
            raise ValueError(f"position_ids has shape {tuple(self.position_ids.shape)}, expected (3, {T})")
        if self.cu_seqlens.shape != self.cu_seqlens_padded.shape:
            raise ValueError("cu_seqlens and cu_seqlens_padded must have the same number of segments")
        if int(self.cu_seqlens_padded[-1]) != T:
            raise ValueError(f"cu_seqlens_padded ends at {int(self.cu_seqlens_padded[-1])}, expected {T}")
        real = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        padded = self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]
        if bool((real < 0).any()) or bool((real > padded).any()):
            raise ValueError("every segment needs 0 <= real length <= padded length")
        if bool((padded % self.pad_multiple != 0).any()):
            raise ValueError(f"every padded segment length must be a multiple of {self.pad_multiple}")
        if self.sample_loss_tokens.shape != (self.num_segments,):
            raise ValueError("sample_loss_tokens needs one entry per segment")
        tokens_per_item = (self.grid_thw.prod(dim=-1) // 4).sum() if self.grid_thw.numel() else 0
        if int(self.visual_mask.sum()) != int(tokens_per_item):
            raise ValueError(f"{int(self.visual_mask.sum())} visual positions but grid_thw gives {int(tokens_per_item)}")
        if self.pixel_values.shape[0] != int(self.grid_thw.prod(dim=-1).sum() if self.grid_thw.numel() else 0):
            raise ValueError("pixel_values rows do not match the patches of grid_thw")
