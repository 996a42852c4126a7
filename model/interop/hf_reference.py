"""transformers' implementation of a config, randomly initialised: the numerical reference of the tests and
the source of the random Hugging Face checkpoints the benchmarks convert.

transformers is imported lazily (inside ``transformers_models``): training never needs it.
"""
from __future__ import annotations

import torch

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.interop.hf_config import config_to_hf
from qwen3vl.model.interop.transformers_models import transformers_config_and_class


def build_hf_model(config: Qwen3VLConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised transformers model (eval mode, sdpa attention) seeded with ``seed``.

    MoE routers start at zero in transformers (every expert tied), which would make top-k routing
    arbitrary; they get N(0, 0.02) weights here so that routing is well defined.
    """
    torch.manual_seed(seed)
    hf_config, model_class = transformers_config_and_class(config_to_hf(config, style="v5"))
    model = model_class._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight") and config.is_moe and not param.abs().sum():
                param.normal_(0.0, 0.02)
    return model.eval()
