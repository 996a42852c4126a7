"""One sample as the model sees it, before packing: what ``SampleEncoder`` emits and the packer consumes.

Its images and videos are held decoded but not normalised (``media``: uint8 frames, see
``qwen3vl.data.image_processing.DecodedFrames``): the float32 patch rows are eight times larger and
are written once, straight into the packed row (``write_pixels``), not into a per-sample buffer that
the packer would then copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from qwen3vl.data.batch import IGNORE_INDEX, PATCH_DIM, TEXT, SampleOrigin


class Medium(Protocol):
    """An image or video of a sample whose patch rows can be written on demand."""

    @property
    def num_patches(self) -> int: ...

    def write(self, out: np.ndarray) -> None:
        """Its [num_patches, PATCH_DIM] float32 patch rows into ``out``."""


@dataclass(frozen=True)
class PatchRows:
    """A medium whose patch rows are already computed ([num_patches, PATCH_DIM] float32), e.g. synthetic
    samples of a measurement."""

    rows: np.ndarray

    @property
    def num_patches(self) -> int:
        return int(self.rows.shape[0])

    def write(self, out: np.ndarray) -> None:
        out[...] = self.rows


@dataclass
class EncodedSample:
    tokens: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, shifted within the sample: labels[p] = target at p; last = IGNORE
    mm_token_type_ids: torch.Tensor  # [L] int64: TEXT, IMAGE or VIDEO
    position_ids: torch.Tensor  # [3, L] int64 MRoPE (t, h, w), from 0
    media: Sequence[Medium]  # images then videos in token order, decoded, not yet patch rows
    grid_thw: torch.Tensor  # [M, 3] int64, one row per image/video in token order
    kind: str
    key: str
    origin: SampleOrigin | None = None  # set by the loader: where the sample came from (the data trace)

    @property
    def length(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_patches(self) -> int:
        return sum(m.num_patches for m in self.media)

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def is_multimodal(self) -> bool:
        return self.grid_thw.shape[0] > 0

    def write_pixels(self, out: np.ndarray) -> None:
        """All patch rows [num_patches, PATCH_DIM] float32 into ``out`` (a slice of the packed row's)."""
        start = 0
        for medium in self.media:
            medium.write(out[start:start + medium.num_patches])
            start += medium.num_patches

    @property
    def pixel_values(self) -> torch.Tensor:
        """[N, PATCH_DIM] float32, materialised on each call (checks and single-sample use; packing
        writes into the row instead)."""
        out = np.empty((self.num_patches, PATCH_DIM), dtype=np.float32)
        self.write_pixels(out)
        return torch.from_numpy(out)

    def validate(self) -> None:
        L = self.length
        if self.labels.shape != (L,) or self.mm_token_type_ids.shape != (L,):
            raise ValueError(f"sample {self.key!r}: labels/mm_token_type_ids must have shape ({L},)")
        if self.position_ids.shape != (3, L):
            raise ValueError(f"sample {self.key!r}: position_ids must have shape (3, {L})")
        patches = int(self.grid_thw.prod(dim=-1).sum()) if self.grid_thw.numel() else 0
        if patches != self.num_patches:
            raise ValueError(f"sample {self.key!r}: {self.num_patches} patch rows but grid_thw gives {patches}")
        if int((self.mm_token_type_ids != TEXT).sum()) * 4 != patches:
            raise ValueError(f"sample {self.key!r}: visual token count does not match grid_thw")
        if L and int(self.labels[-1]) != IGNORE_INDEX:
            raise ValueError(f"sample {self.key!r}: the last label must be IGNORE (nothing follows it)")
