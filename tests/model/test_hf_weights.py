"""HF -> ours -> HF state-dict conversion is a bitwise round trip (dense, MoE in both expert layouts, tied)."""
from __future__ import annotations

import pytest

from qwen3vl.parallel.testing import run_distributed


def _round_trip(name: str) -> dict:
    import torch

    from qwen3vl.model.hf_reference import build_hf_model
    from qwen3vl.model.hf_weights import hf_to_mcore_state_dict, mcore_to_hf_state_dict
    from qwen3vl.model.testing import named_config

    config = named_config(name)
    hf_sd = build_hf_model(config).state_dict()
    if config.tie_word_embeddings:
        hf_sd.pop("lm_head.weight")  # a tied checkpoint has no lm_head.weight
    ours = hf_to_mcore_state_dict(hf_sd, config)
    back = mcore_to_hf_state_dict(ours, config)
    result = {"keys": set(back) ^ set(hf_sd),
              "unequal": sorted(k for k in hf_sd if k in back and not torch.equal(back[k], hf_sd[k]))}
    if config.is_moe:  # the release layout ([E, H, 2I] / [E, I, H]) converts to the same tensors
        release = {k: (v.transpose(1, 2) if k.endswith(("gate_up_proj", "down_proj")) else v)
                   for k, v in hf_sd.items()}
        again = hf_to_mcore_state_dict(release, config)
        result["release_layout_unequal"] = sorted(k for k in ours if not torch.equal(ours[k], again[k]))
    return result


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-tied"])
def test_hf_to_mcore_to_hf_is_bitwise(name):
    result = run_distributed(_round_trip, world_size=1, name=name)[0]
    assert result["keys"] == set()
    assert result["unequal"] == []
    assert result.get("release_layout_unequal", []) == []
