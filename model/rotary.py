"""Rotary position embedding shared by the LLM (MRoPE) and the ViT (2-D RoPE).

Both are NeoX-style (``rotate_half``, pairs (j, j + d/2)) with per-token angles; they differ only in how
the angles are made (``mrope.py``, ``vision_rope.py``). Angles are turned into cos/sin once per forward
and passed through megatron's ``rotary_pos_emb`` argument as one tensor ``[2, T, 1, 1, d]`` (cos, sin),
which ``RotarySelfAttention`` applies to q and k after QK-norm. We apply RoPE ourselves because megatron's
THD path re-indexes the frequencies per segment (wrong for MRoPE, whose positions are not arange) and its
multimodal rotary class is the chunked Qwen2-VL layout.
"""
from __future__ import annotations

import torch


def cos_sin_from_angles(angles: torch.Tensor) -> torch.Tensor:
    """[T, d/2] fp32 angles -> [2, T, 1, 1, d] fp32 (cos, sin) of cat(angles, angles)."""
    emb = torch.cat([angles, angles], dim=-1).float()
    return torch.stack([emb.cos(), emb.sin()])[:, :, None, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor, compute_in_fp32: bool = False) -> torch.Tensor:
    """Rotates ``x`` [T, b, heads, d] by ``cos_sin`` [2, T, 1, 1, d].

    ``compute_in_fp32`` mirrors transformers: the ViT rotates in fp32, the LLM casts cos/sin to the
    activation dtype instead.
    """
    cos, sin = cos_sin[0], cos_sin[1]
    if compute_in_fp32:
        x32 = x.float()
        return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)
