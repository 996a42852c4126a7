"""How the patches of one image/video are laid out in ``pixel_values`` (shared by the ViT parts).

Patch rows come in *block-major* order: for each temporal patch, raster over the 2x2 merge blocks, and
row-major inside each block, so that 4 consecutive rows form one block for the merger. Each temporal
patch (an image, or 2 frames of a video) is a *frame group* that attends only to itself.
"""
from __future__ import annotations

import torch


def block_major_index(h: int, w: int, merge: int) -> torch.Tensor:
    """[h·w] raster indices (r·w + c) of an h x w patch grid listed in block-major order."""
    raster = torch.arange(h * w).view(h // merge, merge, w // merge, merge)
    return raster.permute(0, 2, 1, 3).reshape(-1)


def grid_items(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    """grid_thw [M, 3] -> list of (t, h, w) python ints (one device sync for the whole list)."""
    return [tuple(int(v) for v in row) for row in grid_thw.tolist()]


def frame_group_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """int32 [G + 1] cumulative lengths of the frame groups: repeat(h·w, t) over all items."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
