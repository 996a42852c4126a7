"""HF -> ours -> HF through the weight table is a bitwise round trip over exactly transformers' names (dense,
MoE, tied). The release expert layout is a disk format, read by ``hf_checkpoint``: tests/launch/test_convert.py."""
from __future__ import annotations

import pytest

from qwen3vl_testing.distributed import run_distributed


def _round_trip(name: str) -> dict:
    import torch

    from qwen3vl.model.interop.hf_reference import build_hf_model
    from qwen3vl.model.interop.hf_weights import hf_to_mcore_state_dict, mcore_to_hf_state_dict
    from qwen3vl_testing.model_cases import named_config

    config = named_config(name)
    hf_sd = build_hf_model(config).state_dict()
    if config.tie_word_embeddings:
        hf_sd.pop("lm_head.weight")  # a tied checkpoint has no lm_head.weight
    ours = hf_to_mcore_state_dict(hf_sd, config)
    back = mcore_to_hf_state_dict(ours, config)
    result = {"keys": set(back) ^ set(hf_sd),
              "unequal": sorted(k for k in hf_sd if k in back and not torch.equal(back[k], hf_sd[k]))}
    return result


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-tied"])
def test_hf_to_mcore_to_hf_is_bitwise(name):
    result = run_distributed(_round_trip, world_size=1, name=name)[0]
    assert result["keys"] == set()
    assert result["unequal"] == []
