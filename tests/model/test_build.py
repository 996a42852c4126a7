"""build_model_chunks: what the ViT recomputes follows the explicit choice, else the LLM's full recompute."""
from __future__ import annotations

from qwen3vl.parallel.testing import run_distributed


def _vision_recompute_body() -> dict:
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.presets import get_preset
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    cases = {"default_off": ({}, None), "follows_llm_full": (full, None),
             "explicit_on": ({}, True), "explicit_off_with_llm_full": (full, False)}
    seen = {}
    for name, (overrides, vision_recompute) in cases.items():
        [model] = build_model_chunks(get_preset("tiny"), vision_recompute=vision_recompute, **overrides)
        seen[name] = model.vision.config.recompute_granularity
    return seen


def test_vision_recompute_is_honoured():
    [seen] = run_distributed(_vision_recompute_body, world_size=1)
    assert seen == {"default_off": None, "follows_llm_full": "full",
                    "explicit_on": "full", "explicit_off_with_llm_full": None}
