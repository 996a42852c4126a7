"""transformers' own config object, model class and weight shapes for a ``config.json``.

The one place that turns a config.json dict (Qwen3-VL, or the parts ``assemble`` reads: a Qwen3 /
Qwen3-MoE causal LM, a SigLIP / SigLIP-2 checkpoint) into transformers objects. Checks of a checkpoint's
names and shapes use transformers' model built on the meta device, so they cost no memory and follow
whatever the installed transformers expects. transformers is imported lazily: training never needs it.
"""
from __future__ import annotations

from typing import Any

import torch

from qwen3vl.model.config import ModelConfigError

# model_type -> the transformers class whose weights a checkpoint of that type holds
MODEL_CLASSES = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "siglip2": "Siglip2Model",
    "siglip2_vision_model": "Siglip2VisionModel",
    "siglip": "SiglipModel",
    "siglip_vision_model": "SiglipVisionModel",
}


def transformers_config_and_class(hf: dict[str, Any]) -> tuple[Any, type]:
    """transformers' config object (legacy keys upgraded by it) and model class for a config.json dict."""
    import transformers  # lazy: transformers is optional (the convert extra)

    model_type = hf.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ModelConfigError(f"config.json has model_type={model_type!r}; expected one of {', '.join(MODEL_CLASSES)}")
    rest = {k: v for k, v in hf.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(model_type, **rest)
    return config, getattr(transformers, MODEL_CLASSES[model_type])


def transformers_shapes(hf: dict[str, Any]) -> dict[str, torch.Size]:
    """Every weight name of transformers' model for ``hf`` with its shape (tied weights included once per
    name, as ``state_dict`` lists them)."""
    config, cls = transformers_config_and_class(hf)
    with torch.device("meta"):
        model = cls(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}
