"""Hugging Face ``config.json`` <-> ``Qwen3VLConfig``.

Reads both spellings of the text rotary settings: the hub's legacy ``rope_theta`` + ``rope_scaling``
(``mrope_section``) keys and transformers 5.x's ``rope_parameters``. Tying is decided by the top-level
``tie_word_embeddings`` (as transformers 5.x does), falling back to the text config's flag.
Writes either style (``style="legacy"`` is what the released checkpoints carry and every transformers
version reads; ``style="v5"`` is what transformers 5.x re-serialises).
"""
from __future__ import annotations

from typing import Any, Literal

from qwen3vl.model.config import ModelConfigError, Qwen3VLConfig, TextConfig, VisionConfig

_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
             "router_aux_loss_coef")


def _text_rope(text: dict[str, Any]) -> tuple[float, tuple[int, int, int]]:
    params = text.get("rope_parameters") or {}
    legacy = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta"))
    section = params.get("mrope_section", legacy.get("mrope_section"))
    if theta is None or section is None:
        raise ModelConfigError("text_config needs rope_theta and mrope_section (either in rope_parameters or as "
                          "rope_theta + rope_scaling.mrope_section)")
    return float(theta), tuple(int(s) for s in section)


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> Qwen3VLConfig:
    """Builds our config from a parsed Qwen3-VL / Qwen3-VL-MoE ``config.json``."""
    if "text_config" not in hf or "vision_config" not in hf:
        raise ModelConfigError("not a Qwen3-VL config.json: it needs text_config and vision_config")
    text, vision = hf["text_config"], hf["vision_config"]
    theta, section = _text_rope(text)
    moe = {k: text[k] for k in _MOE_KEYS if k in text}
    # transformers 5.x save_pretrained writes the expert count under its alias num_local_experts.
    if "num_experts" not in moe and "num_local_experts" in text:
        moe["num_experts"] = text["num_local_experts"]
    if "mlp_only_layers" in text:
        moe["mlp_only_layers"] = tuple(text["mlp_only_layers"] or ())
    text_config = TextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"], num_key_value_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=theta, mrope_section=section,
        max_position_embeddings=text.get("max_position_embeddings", 262144),
        hidden_act=text.get("hidden_act", "silu"), **moe)
    vision_rope = (vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    vision_config = VisionConfig(
        depth=vision["depth"], hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_heads=vision["num_heads"], in_channels=vision.get("in_channels", 3),
        patch_size=vision.get("patch_size", 16), temporal_patch_size=vision.get("temporal_patch_size", 2),
        spatial_merge_size=vision.get("spatial_merge_size", 2), out_hidden_size=vision["out_hidden_size"],
        num_position_embeddings=vision.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(vision["deepstack_visual_indexes"]), rope_theta=float(vision_rope),
        hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"))
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Qwen3VLConfig(
        name=name, vision=vision_config, text=text_config, tie_word_embeddings=bool(tie),
        image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        vision_end_token_id=hf.get("vision_end_token_id", 151653)).validate()


def config_to_hf(config: Qwen3VLConfig, style: Literal["legacy", "v5"] = "legacy") -> dict[str, Any]:
    """The ``config.json`` dict transformers builds the same model from."""
    t, v, moe = config.text, config.vision, config.is_moe
    text: dict[str, Any] = dict(
        model_type="qwen3_vl_moe_text" if moe else "qwen3_vl_text", vocab_size=t.vocab_size,
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim, hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps, attention_bias=False,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings)
    rope = dict(rope_type="default", mrope_section=list(t.mrope_section), mrope_interleaved=True)
    if style == "legacy":
        text.update(rope_theta=t.rope_theta, rope_scaling=rope)
    else:
        text.update(rope_parameters=dict(rope_theta=t.rope_theta, **rope))
    if moe:
        text.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                    moe_intermediate_size=t.moe_intermediate_size, decoder_sparse_step=t.decoder_sparse_step,
                    mlp_only_layers=list(t.mlp_only_layers), router_aux_loss_coef=t.router_aux_loss_coef,
                    norm_topk_prob=True)
    vision = dict(
        model_type=("qwen3_vl_moe" if moe else "qwen3_vl") if style == "legacy"
        else ("qwen3_vl_moe_vision" if moe else "qwen3_vl_vision"),
        depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
        in_channels=v.in_channels, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        spatial_merge_size=v.spatial_merge_size, out_hidden_size=v.out_hidden_size,
        num_position_embeddings=v.num_position_embeddings,
        deepstack_visual_indexes=list(v.deepstack_visual_indexes), hidden_act=v.hidden_act)
    if style == "v5":
        vision["rope_parameters"] = dict(rope_theta=v.rope_theta, rope_type="axial")
    return dict(
        architectures=["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        model_type="qwen3_vl_moe" if moe else "qwen3_vl", text_config=text, vision_config=vision,
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings)

