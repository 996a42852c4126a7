"""2-D rotary embedding of the vision tower.

A head of dim hv rotates with hv/4 base frequencies inv[k] = theta^(-k/(hv/4)). Each patch's angle vector
is [row·inv, col·inv] (its full-resolution patch coordinates), duplicated to hv and applied NeoX-style:
dims [0, hv/4) and [hv/2, 3hv/4) follow the row, the others the column. There is no temporal component.
"""
from __future__ import annotations

import torch

from qwen3vl.model.rotary import cos_sin_from_angles
from qwen3vl.model.vision_grid import block_major_index, grid_items


class VisionRotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, merge: int) -> None:
        super().__init__()
        dim = head_dim // 2
        # Plain attribute, not a buffer, so a bf16 cast of the model leaves it fp32.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.merge = merge

    def forward(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """grid_thw [M, 3] -> cos/sin [2, N, 1, 1, head_dim] for the N patches in pixel_values order."""
        coords = []
        for t, h, w in grid_items(grid_thw):
            order = block_major_index(h, w, self.merge)
            rc = torch.stack([order // w, order % w], dim=-1)  # [h·w, 2] (row, col)
            coords.append(rc.repeat(t, 1))
        rc = torch.cat(coords).to(grid_thw.device).float()
        inv = self.inv_freq.to(grid_thw.device)
        angles = torch.cat([rc[:, :1] * inv, rc[:, 1:] * inv], dim=-1)  # [N, head_dim/2]
        return cos_sin_from_angles(angles)
