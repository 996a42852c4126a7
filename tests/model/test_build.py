"""build_model_chunks: what the ViT recomputes follows the explicit choice, else the LLM's full recompute."""
from __future__ import annotations

from qwen3vl_testing.distributed import run_distributed


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


def _device_body() -> dict:
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.presets import get_preset
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    devices = {}
    for name in ("tiny", "tiny-moe"):
        [model] = build_model_chunks(get_preset(name), device="meta")
        tensors = list(model.parameters()) + list(model.buffers())
        devices[name] = sorted({t.device.type for t in tensors})
        devices[f"{name}_cpu_init"] = model.config.use_cpu_initialization
    return devices


def test_the_whole_model_lands_on_the_device_the_caller_names():
    """Not half on the GPU (megatron's layers) and half on the CPU (the model's own norms and embeddings):
    built for a non-CUDA device, megatron creates its weights on the CPU and the whole model moves."""
    [devices] = run_distributed(_device_body, world_size=1)
    assert devices == {"tiny": ["meta"], "tiny-moe": ["meta"], "tiny_cpu_init": True, "tiny-moe_cpu_init": True}
