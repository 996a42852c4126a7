"""Every preset builds a model with exactly as many parameters as transformers builds from the same numbers.

Both models are built on the meta device (no memory), ours on one rank through the public builder.
"""
from __future__ import annotations

import pytest

from qwen3vl.model.presets import PRESET_NAMES
from qwen3vl_testing.distributed import run_distributed


def _count_parameters() -> dict:
    import torch

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.hf_config import config_to_hf
    from qwen3vl.model.interop.transformers_models import transformers_config_and_class
    from qwen3vl.model.presets import get_preset
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    counts = {}
    for name in PRESET_NAMES:
        config = get_preset(name)
        with torch.device("meta"):
            [ours] = build_model_chunks(config, perform_initialization=False, device="meta")
            hf_config, model_class = transformers_config_and_class(config_to_hf(config, style="v5"))
            theirs = model_class(hf_config)
        # parameters() counts a tied weight once, in both models.
        counts[name] = (sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters()))
    return counts


@pytest.fixture(scope="module")
def counts():
    return run_distributed(_count_parameters, world_size=1, timeout=300)[0]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_parameter_count_matches_transformers(counts, name):
    ours, theirs = counts[name]
    assert ours == theirs


def test_released_sizes_are_the_advertised_ones(counts):
    billions = {name: counts[name][0] / 1e9 for name in ("2B", "4B", "8B", "32B", "30B-A3B", "235B-A22B")}
    assert [round(b) for b in billions.values()] == [2, 4, 9, 33, 31, 236]
