"""Interleaved multimodal RoPE of the Qwen3-VL LLM.

Rotary frequency i (of head_dim/2) takes its position from row axis(i) of the 3-row position ids
(t, h, w): h if i % 3 == 1 and i < 3·section_h, w if i % 3 == 2 and i < 3·section_w, else t. With the
release's section (24, 20, 20) that is t,h,w,t,h,w,… for i < 60, then t. For text-only input the three
rows are equal and this is plain 1-D RoPE. (megatron-core 0.16.1's MultimodalRotaryEmbedding is the
chunked Qwen2-VL layout, which no weight permutation can turn into this one.)
"""
from __future__ import annotations

import torch

from qwen3vl.model.rotary import cos_sin_from_angles


def interleaved_axis_map(head_dim: int, mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """[head_dim/2] int64: which position row (0 = t, 1 = h, 2 = w) drives each frequency."""
    i = torch.arange(head_dim // 2)
    axis = torch.zeros_like(i)
    axis[(i % 3 == 1) & (i < 3 * mrope_section[1])] = 1
    axis[(i % 3 == 2) & (i < 3 * mrope_section[2])] = 2
    return axis


class InterleavedMRoPE(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int]) -> None:
        super().__init__()
        # Plain attributes, not buffers: a bf16 cast of the model (megatron's Float16Module) would round
        # buffers, and these must stay fp32. They are never part of a checkpoint (as in transformers).
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.inv_freq = 1.0 / (theta**exponent)
        self.axis = interleaved_axis_map(head_dim, mrope_section)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[3, T] int position ids -> cos/sin [2, T, 1, 1, head_dim] fp32."""
        if position_ids.dim() != 2 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, T] (t, h, w rows), got {tuple(position_ids.shape)}")
        device = position_ids.device
        pos = position_ids.float()  # [3, T]
        angles = pos[self.axis.to(device)].transpose(0, 1) * self.inv_freq.to(device)  # [T, head_dim/2]
        return cos_sin_from_angles(angles)
