"""Patch embedding of the vision tower: the Conv3d(3, D, kernel = stride = (2, 16, 16)) with bias.

Each row of ``pixel_values`` is one patch already flattened in the Conv3d kernel order (C, T, Ph, Pw), so
the convolution is exactly a Linear on the row with weight ``conv.weight.reshape(D, C·T·Ph·Pw)``. The
weight is replicated on tensor-parallel ranks (it is small and every rank needs all of D).
"""
from __future__ import annotations

import torch


class PatchEmbed(torch.nn.Module):
    def __init__(self, patch_dim: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(patch_dim, hidden_size, bias=True, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, patch_dim] -> [N, D] (input cast to the weight dtype, as transformers does)."""
        return self.proj(pixel_values.to(self.proj.weight.dtype))
