"""Dense reference for packed attention: one [T, T] mask, plain softmax. Slow and memory-hungry by design;
it is the oracle the tests (and ``benchmarks/attention_bench.py``) compare the packed kernels against."""
from __future__ import annotations

import math

import torch


def packed_attention_mask(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor, causal: bool) -> torch.Tensor:
    """[T, T] bool, True where query row q may read key row k: same segment, both real, causal if asked."""
    bounds = cu_seqlens_padded.long()
    padded = bounds[1:] - bounds[:-1]
    real = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(padded.numel()), padded)
    position = torch.arange(int(bounds[-1]))
    is_real = (position - bounds[:-1][segment]) < real[segment]
    allowed = (segment[:, None] == segment[None, :]) & is_real[:, None] & is_real[None, :]
    if causal:
        allowed &= position[None, :] <= position[:, None]
    return allowed


def dense_packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """query [T, Hq, D], key/value [T, Hkv, D], allowed [T, T] -> [T, Hq·D]; rows with no key output 0."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", query, key) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, value).reshape(query.shape[0], -1)
