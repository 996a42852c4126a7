"""The two normalisations of Qwen3-VL, as megatron layer-spec modules (``module(config, hidden_size, eps)``).

Ours rather than megatron's torch fallback because (1) that fallback refuses sequence parallelism and
(2) transformers computes RMSNorm in fp32 and casts back before the weight multiply; doing the same keeps
bf16 runs close to the reference. Under sequence parallelism each rank sees a different slice of the
sequence, so the weights carry ``sequence_parallel = True`` and megatron all-reduces their gradients
over the tensor-parallel group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters():
        setattr(param, "sequence_parallel", bool(config.sequence_parallel))


class RMSNorm(torch.nn.Module):
    """Qwen3 RMSNorm: x * rsqrt(mean(x²) + eps) in fp32, cast back, times weight (no bias)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class LayerNorm(torch.nn.Module):
    """LayerNorm with bias (the vision tower and the mergers)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
