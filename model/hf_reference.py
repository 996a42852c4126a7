"""The transformers implementation of a config, used as the numerical reference (tests, conversion checks).

transformers is imported lazily: training never needs it.
"""
from __future__ import annotations

import torch

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.hf_config import config_to_hf


def hf_config_object(config: Qwen3VLConfig):
    """transformers' ``Qwen3VLConfig`` / ``Qwen3VLMoeConfig`` with the same numbers."""
    from transformers import AutoConfig

    data = config_to_hf(config, style="v5")
    return AutoConfig.for_model(data.pop("model_type"), **data)


def hf_model_class(config: Qwen3VLConfig):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration if config.is_moe else Qwen3VLForConditionalGeneration


def build_hf_model(config: Qwen3VLConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised transformers model (eval mode, sdpa attention) seeded with ``seed``.

    MoE routers start at zero in transformers (every expert tied), which would make top-k routing
    arbitrary; they get N(0, 0.02) weights here so that routing is well defined.
    """
    torch.manual_seed(seed)
    model = hf_model_class(config)._from_config(hf_config_object(config), dtype=dtype,
                                               attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight") and config.is_moe and not param.abs().sum():
                param.normal_(0.0, 0.02)
    return model.eval()
