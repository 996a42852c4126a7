"""The Qwen3-VL architecture of an assembled model: read off its two parts, checked against a preset.

The LLM gives the text side (every size, the norms' epsilon, the rope theta unless ``rope_theta`` is
given, tying, the MoE fields) and the ViT its blocks (depth, width, heads, patch size, LayerNorm epsilon).
What neither part has comes from the preset -- the MRoPE split, the DeepStack block indexes, the position
grid the learned table is resampled to -- or, without one, from the arguments (required then; the table
keeps SigLIP's own grid). So do the fields that say how the Qwen3-VL model is trained rather than what the
LLM's weights are (``_TRAINING_FIELDS``: the context length it is built for, 256K where the Qwen3 LLMs
say 40K, and the MoE load-balancing coefficient); without a preset they are the LLM's. Every
shape-bearing field of a part must equal the preset's; all mismatches are refused at once, each with
both values.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Optional, Sequence

from qwen3vl.model.config import ModelConfigError, Qwen3VLConfig, TextConfig, VisionConfig
from qwen3vl.model.presets import get_preset

# Fields the parts decide; with a preset they must agree with it (they fix the weights' shapes).
_TEXT_SHAPES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "decoder_sparse_step", "mlp_only_layers")
_VISION_SHAPES = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size")
# Text fields a preset decides over the LLM's config.json (they carry no weights and no trained numerics).
_TRAINING_FIELDS = ("max_position_embeddings", "router_aux_loss_coef")


def _rope_theta(llm: dict[str, Any]) -> float:
    theta = (llm.get("rope_parameters") or {}).get("rope_theta", llm.get("rope_theta"))
    if theta is None:
        raise ModelConfigError("the LLM's config.json has no rope_theta (neither rope_parameters.rope_theta nor "
                          "rope_theta): pass --rope-theta")
    return float(theta)


def text_from_qwen3(llm: dict[str, Any], mrope_section: Sequence[int], rope_theta: Optional[float]) -> TextConfig:
    if llm.get("attention_bias"):
        raise ModelConfigError("the LLM has attention biases (attention_bias=true); Qwen3-VL's attention has none")
    if llm.get("use_sliding_window"):
        raise ModelConfigError("the LLM uses sliding-window attention (use_sliding_window=true); Qwen3-VL attends to "
                          "the whole sequence")
    moe = llm.get("model_type") == "qwen3_moe"
    if moe and not llm.get("norm_topk_prob", False):
        raise ModelConfigError("the LLM's router does not renormalise its top-k weights (norm_topk_prob=false); "
                          "Qwen3-VL's always does, so the assembled model would route differently")
    extra = {}
    if moe:
        extra = dict(num_experts=llm.get("num_experts", llm.get("num_local_experts")),
                     num_experts_per_tok=llm["num_experts_per_tok"],
                     moe_intermediate_size=llm["moe_intermediate_size"],
                     decoder_sparse_step=llm.get("decoder_sparse_step", 1),
                     mlp_only_layers=tuple(llm.get("mlp_only_layers") or ()),
                     router_aux_loss_coef=llm.get("router_aux_loss_coef", 0.001))
    return TextConfig(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
        num_layers=llm["num_hidden_layers"], num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_key_value_heads"],
        head_dim=llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"],
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta) if rope_theta is not None else _rope_theta(llm),
        mrope_section=tuple(mrope_section), max_position_embeddings=llm.get("max_position_embeddings", 262144),
        hidden_act=llm.get("hidden_act", "silu"), **extra)


def _siglip_grid(vision: dict[str, Any]) -> int:
    """Positions in SigLIP's own learned table (NaFlex: num_patches; fixed resolution: the image's grid)."""
    if "num_patches" in vision:
        return int(vision["num_patches"])
    return (int(vision["image_size"]) // int(vision["patch_size"])) ** 2


def vision_from_siglip(vision: dict[str, Any], out_hidden_size: int, num_position_embeddings: int,
                       deepstack_visual_indexes: Sequence[int]) -> VisionConfig:
    if vision.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ModelConfigError(f"the vision tower's hidden_act is {vision['hidden_act']!r}; Qwen3-VL's ViT uses "
                          "gelu_pytorch_tanh")
    return VisionConfig(
        depth=vision["num_hidden_layers"], hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
        in_channels=vision.get("num_channels", 3), patch_size=vision["patch_size"],
        out_hidden_size=out_hidden_size, num_position_embeddings=num_position_embeddings,
        deepstack_visual_indexes=tuple(deepstack_visual_indexes), layer_norm_eps=vision.get("layer_norm_eps", 1e-6))


def _differences(ours, theirs, names: Sequence[str], prefix: str, what: str) -> list[str]:
    return [f"{prefix}{name}: preset {what} has {getattr(theirs, name)!r}, the parts give {getattr(ours, name)!r}"
            for name in names if getattr(ours, name) != getattr(theirs, name)]


def assembled_config(llm: dict[str, Any], vision: dict[str, Any], preset: Optional[str] = None, *,
                     name: str = "assembled", rope_theta: Optional[float] = None,
                     mrope_section: Optional[Sequence[int]] = None,
                     deepstack_visual_indexes: Optional[Sequence[int]] = None) -> Qwen3VLConfig:
    """The architecture of the LLM ``llm`` + vision tower ``vision`` (their config.json dicts)."""
    base = get_preset(preset) if preset else None
    missing = [flag for flag, value in (("--mrope-section", mrope_section),
                                        ("--deepstack-visual-indexes", deepstack_visual_indexes))
               if value is None and base is None]
    if missing:
        raise ModelConfigError(f"without --preset there is no release value for {' and '.join(missing)}: pass "
                          f"{' and '.join(missing)} (or --preset NAME)")
    text = text_from_qwen3(llm, mrope_section or base.text.mrope_section, rope_theta)
    grid = base.vision.num_position_embeddings if base else _siglip_grid(vision)
    deepstack = deepstack_visual_indexes if deepstack_visual_indexes is not None else \
        base.vision.deepstack_visual_indexes
    vit = vision_from_siglip(vision, text.hidden_size, grid, deepstack)
    tie = bool(llm.get("tie_word_embeddings", False))
    if base is not None:
        problems = (_differences(text, base.text, _TEXT_SHAPES, "text.", preset)
                    + _differences(vit, base.vision, _VISION_SHAPES, "vision.", preset))
        if tie != base.tie_word_embeddings:
            problems.append(f"tie_word_embeddings: preset {preset} has {base.tie_word_embeddings}, the LLM {tie}")
        if problems:
            raise ModelConfigError(f"the parts do not fit preset {preset}:\n  " + "\n  ".join(problems)
                              + "\npick the preset of this LLM and vision tower, or leave --preset out")
        text = replace(text, **{field: getattr(base.text, field) for field in _TRAINING_FIELDS})
        return replace(base, name=name, text=text, vision=vit).validate()
    return Qwen3VLConfig(name=name, vision=vit, text=text, tie_word_embeddings=tie).validate()


def changed_fields(config: Qwen3VLConfig, preset: str) -> list[str]:
    """Non-shape fields where the assembled config differs from the preset (reported by the command)."""
    base = get_preset(preset)
    out = []
    for part in ("text", "vision"):
        ours, theirs = getattr(config, part), getattr(base, part)
        out += [f"{part}.{f.name}={getattr(ours, f.name)!r} (preset {getattr(theirs, f.name)!r})"
                for f in fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)]
    return out
