"""Architecture configs: presets, validation messages, config.json in both rotary spellings."""
from __future__ import annotations

from dataclasses import replace

import pytest

from qwen3vl.model.config import ModelConfigError
from qwen3vl.model.interop.hf_config import config_from_hf, config_to_hf
from qwen3vl.model.presets import PRESET_NAMES, get_preset

RELEASED = ("2B", "4B", "8B", "32B", "30B-A3B", "235B-A22B")


def test_every_released_size_and_the_tiny_ones_are_presets():
    assert set(RELEASED) | {"tiny", "tiny-moe"} == set(PRESET_NAMES)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="235B-A22B"):
        get_preset("7B")


@pytest.mark.parametrize("name", RELEASED)
def test_released_numbers(name):
    config = get_preset(name)
    # Shared by every release (their config.json files).
    assert (config.text.vocab_size, config.text.head_dim, config.text.rope_theta) == (151936, 128, 5e6)
    assert config.text.mrope_section == (24, 20, 20)
    assert config.vision.out_hidden_size == config.text.hidden_size
    assert config.tie_word_embeddings == (name in ("2B", "4B"))
    assert config.vision.deepstack_visual_indexes == ((5, 11, 17) if name in ("2B", "4B") else (8, 16, 24))
    assert config.is_moe == name.endswith(("A3B", "A22B"))
    if config.is_moe:
        assert (config.text.num_experts, config.text.num_experts_per_tok) == (128, 8)


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("style", ["legacy", "v5"])
def test_hf_config_round_trip(name, style):
    config = get_preset(name)
    data = config_to_hf(config, style=style)
    if style == "legacy":
        assert "rope_scaling" in data["text_config"] and "rope_parameters" not in data["text_config"]
    else:
        assert "rope_parameters" in data["text_config"] and "rope_theta" not in data["text_config"]
    assert config_from_hf(data, name=name) == config


def test_hub_style_moe_config_is_read():
    """The 30B-A3B config.json as the hub ships it (legacy keys, transformers 4.57 era)."""
    hub = {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_moe_text", "vocab_size": 151936, "hidden_size": 2048,
            "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "rope_theta": 5000000,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "norm_topk_prob": True, "attention_bias": False},
        "vision_config": {
            "model_type": "qwen3_vl_moe", "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
            "num_heads": 16, "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "out_hidden_size": 2048, "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh"},
    }
    expected = get_preset("30B-A3B")
    assert config_from_hf(hub, name="30B-A3B") == replace(expected, text=replace(expected.text,
                                                                                 router_aux_loss_coef=0.001))


def test_moe_config_saved_by_transformers_5_is_read():
    """transformers 5.x save_pretrained spells the expert count num_local_experts."""
    transformers = pytest.importorskip("transformers")
    config = get_preset("tiny-moe")
    saved = transformers.Qwen3VLMoeConfig(**config_to_hf(config, style="v5")).to_dict()
    assert "num_experts" not in saved["text_config"] and "num_local_experts" in saved["text_config"]
    assert config_from_hf(saved, name=config.name).text.num_experts == config.text.num_experts


def test_top_level_tie_flag_wins():
    data = config_to_hf(get_preset("2B"))
    data["text_config"]["tie_word_embeddings"] = False
    assert config_from_hf(data).tie_word_embeddings is True


@pytest.mark.parametrize("change, message", [
    (lambda c: replace(c, text=replace(c.text, mrope_section=(6, -5, 4))), "mrope_section"),
    (lambda c: replace(c, text=replace(c.text, num_key_value_heads=3)), "num_key_value_heads"),
    (lambda c: replace(c, vision=replace(c.vision, deepstack_visual_indexes=(0, 9))), "deepstack_visual_indexes"),
    (lambda c: replace(c, vision=replace(c.vision, out_hidden_size=32)), "out_hidden_size"),
    (lambda c: replace(c, vision=replace(c.vision, num_position_embeddings=60)), "perfect square"),
    (lambda c: replace(c, text=replace(c.text, num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8)),
     "num_experts_per_tok"),
    (lambda c: replace(c, image_token_id=10**6), "vocab_size"),
])
def test_validation_says_what_to_change(change, message):
    with pytest.raises(ModelConfigError, match=message):
        change(get_preset("tiny")).validate()


def test_moe_layer_rule_follows_transformers():
    text = replace(get_preset("tiny-moe").text, decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [text.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
