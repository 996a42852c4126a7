"""Named architectures: the released Qwen3-VL sizes and two tiny random ones for tests and the demo.

Numbers come from the released config.json files (the Qwen/Qwen3-VL-* repositories on the Hugging Face hub).
``get_preset(name)`` returns a fresh, validated ``Qwen3VLConfig``; ``PRESET_NAMES`` lists them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from qwen3vl.model.config import Qwen3VLConfig, TextConfig, VisionConfig

# The two ViT sizes of the release: a 24-block one for 2B/4B and a 27-block one for the rest.
_VIT_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                  deepstack_visual_indexes=(5, 11, 17))
_VIT_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  deepstack_visual_indexes=(8, 16, 24))


def _release(name: str, vit: dict, tie: bool, **text: int) -> Qwen3VLConfig:
    text_config = TextConfig(**text)
    return Qwen3VLConfig(name=name, vision=VisionConfig(out_hidden_size=text_config.hidden_size, **vit),
                         text=text_config, tie_word_embeddings=tie)


def _tiny() -> Qwen3VLConfig:
    return Qwen3VLConfig(
        name="tiny",
        vision=VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                            num_position_embeddings=64, deepstack_visual_indexes=(0, 1, 2)),
        text=TextConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, mrope_section=(6, 5, 5), max_position_embeddings=4096),
        tie_word_embeddings=False,
    )


def _tiny_moe() -> Qwen3VLConfig:
    base = _tiny()
    return replace(base, name="tiny-moe",
                   text=replace(base.text, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24))


_PRESETS: dict[str, Callable[[], Qwen3VLConfig]] = {
    "2B": lambda: _release("2B", _VIT_SMALL, True, hidden_size=2048, num_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, intermediate_size=6144),
    "4B": lambda: _release("4B", _VIT_SMALL, True, hidden_size=2560, num_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, intermediate_size=9728),
    "8B": lambda: _release("8B", _VIT_LARGE, False, hidden_size=4096, num_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, intermediate_size=12288),
    "32B": lambda: _release("32B", _VIT_LARGE, False, hidden_size=5120, num_layers=64, num_attention_heads=64,
                            num_key_value_heads=8, intermediate_size=25600),
    "30B-A3B": lambda: _release("30B-A3B", _VIT_LARGE, False, hidden_size=2048, num_layers=48,
                                num_attention_heads=32, num_key_value_heads=4, intermediate_size=6144,
                                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "235B-A22B": lambda: _release("235B-A22B", _VIT_LARGE, False, hidden_size=4096, num_layers=94,
                                  num_attention_heads=64, num_key_value_heads=4, intermediate_size=12288,
                                  num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536),
    "tiny": _tiny,
    "tiny-moe": _tiny_moe,
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str) -> Qwen3VLConfig:
    """A fresh copy of the named architecture (safe to modify)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return _PRESETS[name]().validate()
