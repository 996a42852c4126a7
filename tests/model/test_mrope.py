"""Interleaved MRoPE against transformers' Qwen3-VL rotary embedding, for the release's section and for
sections transformers accepts and computes although they do not sum to head_dim/2 (or overflow it)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qwen3vl.model.config import ModelConfigError
from qwen3vl.model.mrope import InterleavedMRoPE
from qwen3vl.model.presets import get_preset


@pytest.mark.parametrize("head_dim, section", [
    (128, (24, 20, 20)), (16, (2, 3, 3)), (32, (6, 5, 4)), (16, (0, 8, 0)), (16, (10, 10, 10)), (32, (16, 0, 0))])
def test_cos_sin_equal_transformers(head_dim, section):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    theta = 5_000_000.0
    config = Qwen3VLTextConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                               rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                "mrope_section": list(section)})
    positions = torch.randint(0, 4096, (3, 1, 37), generator=torch.Generator().manual_seed(0))
    cos, sin = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1, 37, head_dim), positions)
    ours = InterleavedMRoPE(head_dim, theta, section)(positions[:, 0])  # [2, T, 1, 1, head_dim]
    assert torch.equal(ours[0, :, 0, 0], cos[0]) and torch.equal(ours[1, :, 0, 0], sin[0])


@pytest.mark.parametrize("section", [(2, 3, 3), (6, 5, 4), (0, 16, 16)])
def test_model_config_accepts_what_transformers_computes(section):
    tiny = get_preset("tiny")
    config = replace(tiny, text=replace(tiny.text, mrope_section=section))
    config.validate()  # raises ModelConfigError on a refused section
    # What it accepts, the model computes as transformers does for that config.
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    t = config.text
    theirs = Qwen3VLTextConfig(hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads,
                               head_dim=t.head_dim, rope_parameters={"rope_type": "default",
                                                                     "rope_theta": t.rope_theta,
                                                                     "mrope_section": list(section)})
    positions = torch.randint(0, 512, (3, 1, 11), generator=torch.Generator().manual_seed(1))
    cos, sin = Qwen3VLTextRotaryEmbedding(theirs)(torch.zeros(1, 11, t.head_dim), positions)
    ours = InterleavedMRoPE(t.head_dim, t.rope_theta, t.mrope_section)(positions[:, 0])
    assert torch.equal(ours[0, :, 0, 0], cos[0]) and torch.equal(ours[1, :, 0, 0], sin[0])


@pytest.mark.parametrize("section", [(6, -1, 5), (8, 8), (8, 4, 2, 2), (8.0, 4, 4)])
def test_model_config_refuses_sections_that_are_not_counts(section):
    tiny = get_preset("tiny")
    with pytest.raises(ModelConfigError, match="mrope_section .* must be three counts"):
        replace(tiny, text=replace(tiny.text, mrope_section=section)).validate()
