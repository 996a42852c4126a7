"""One sample as the model sees it, before packing: what ``SampleEncoder`` emits and the packer consumes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen3vl.data.batch import IGNORE_INDEX, PATCH_DIM, TEXT


@dataclass
class EncodedSample:
    tokens: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, shifted within the sample: labels[p] = target at p; last = IGNORE
    mm_token_type_ids: torch.Tensor  # [L] int64: TEXT, IMAGE or VIDEO
    position_ids: torch.Tensor  # [3, L] int64 MRoPE (t, h, w), from 0
    pixel_values: torch.Tensor  # [N, PATCH_DIM] float32, images then videos in token order
    grid_thw: torch.Tensor  # [M, 3] int64, one row per image/video in token order
    kind: str
    key: str

    @property
    def length(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def is_multimodal(self) -> bool:
        return self.grid_thw.shape[0] > 0

    def validate(self) -> None:
        L = self.length
        if self.labels.shape != (L,) or self.mm_token_type_ids.shape != (L,):
            raise ValueError(f"sample {self.key!r}: labels/mm_token_type_ids must have shape ({L},)")
        if self.position_ids.shape != (3, L):
            raise ValueError(f"sample {self.key!r}: position_ids must have shape (3, {L})")
        if self.pixel_values.ndim != 2 or self.pixel_values.shape[1] != PATCH_DIM:
            raise ValueError(f"sample {self.key!r}: pixel_values must be [N, {PATCH_DIM}]")
        patches = int(self.grid_thw.prod(dim=-1).sum()) if self.grid_thw.numel() else 0
        if patches != self.num_patches:
            raise ValueError(f"sample {self.key!r}: {self.num_patches} patch rows but grid_thw gives {patches}")
        if int((self.mm_token_type_ids != TEXT).sum()) * 4 != patches:
            raise ValueError(f"sample {self.key!r}: visual token count does not match grid_thw")
        if L and int(self.labels[-1]) != IGNORE_INDEX:
            raise ValueError(f"sample {self.key!r}: the last label must be IGNORE (nothing follows it)")
