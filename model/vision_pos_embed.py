"""Learned absolute position embedding of the vision tower, resampled to each image's patch grid.

The table is a side x side grid (48 x 48 in the release). For an h x w patch grid it is resampled
bilinearly with align_corners semantics (source row r·(side-1)/(h-1), 0 when h == 1; same for columns),
laid out block-major, repeated for each temporal patch, and added to the patch embeddings before block 0.
"""
from __future__ import annotations

import torch

from qwen3vl.model.vision_grid import block_major_index, grid_items


def _source_coords(n: int, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    src = torch.arange(n, dtype=torch.float64) * ((side - 1) / (n - 1)) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo = src.floor().long().clamp(max=side - 1)
    hi = (lo + 1).clamp(max=side - 1)
    return lo, hi, (src - lo).float()


class VisionPositionEmbedding(torch.nn.Module):
    def __init__(self, num_positions: int, hidden_size: int, merge: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.side = int(num_positions**0.5)
        self.merge = merge
        self.weight = torch.nn.Parameter(torch.empty(num_positions, hidden_size, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)

    def resample(self, h: int, w: int) -> torch.Tensor:
        """[h·w, D] embeddings of an h x w grid in raster order (summed in fp32, cast to the table dtype)."""
        r0, r1, dr = _source_coords(h, self.side)
        c0, c1, dc = _source_coords(w, self.side)
        dr, dc = dr.to(self.weight.device)[:, None, None], dc.to(self.weight.device)[None, :, None]
        table = self.weight.float()

        def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            idx = (rows[:, None] * self.side + cols[None, :]).to(self.weight.device)
            return table[idx]  # [h, w, D]

        out = (corner(r0, c0) * (1 - dr) * (1 - dc) + corner(r0, c1) * (1 - dr) * dc
               + corner(r1, c0) * dr * (1 - dc) + corner(r1, c1) * dr * dc)
        return out.reshape(h * w, -1).to(self.weight.dtype)

    def forward(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """grid_thw [M, 3] -> [N, D] position embeddings in pixel_values (block-major) order."""
        parts = []
        for t, h, w in grid_items(grid_thw):
            order = block_major_index(h, w, self.merge).to(self.weight.device)
            parts.append(self.resample(h, w)[order].repeat(t, 1))
        return torch.cat(parts)
