"""Megatron ``SelfAttention`` that applies our precomputed per-token rotary cos/sin itself.

The layer passes ``rotary_pos_emb`` = cos/sin ``[2, T, 1, 1, d]`` (see ``rotary.py``); we keep it from
megatron (which would re-index it per packed segment) and rotate q and k right after the projection and
QK-norm, exactly where transformers applies RoPE. Under context parallelism the cos/sin are already
CP-local (made from CP-local position ids), so no further slicing is needed.
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention

from qwen3vl.model.rotary import apply_rotary


class RotarySelfAttention(SelfAttention):
    def __init__(self, *args: Any, rotary_in_fp32: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rotary_in_fp32 = rotary_in_fp32
        self._cos_sin: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, *args: Any,
                rotary_pos_emb: torch.Tensor | None = None, **kwargs: Any):
        # Held only for the duration of this call (activation recompute calls forward again with it).
        self._cos_sin = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._cos_sin = None

    def get_query_key_value_tensors(self, *args: Any, **kwargs: Any):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._cos_sin is None:
            return out
        query, key, *rest = out
        query = apply_rotary(query, self._cos_sin, self.rotary_in_fp32)
        key = apply_rotary(key, self._cos_sin, self.rotary_in_fp32)
        return (query, key, *rest)
