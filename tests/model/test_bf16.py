"""bf16 weights: the dense model reproduces transformers' own bf16 logits (same casts, same order of
operations), and the MoE model trains (finite loss and gradients) within bf16 noise of transformers."""
from __future__ import annotations

import pytest
import torch

from qwen3vl.parallel.testing import run_distributed


def _bf16_body(preset: str) -> dict:
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.hf_reference import build_hf_model
    from qwen3vl.model.hf_weights import hf_to_mcore_state_dict
    from qwen3vl.model.presets import get_preset
    from qwen3vl.model.state_dict_sharding import load_full_state_dict
    from qwen3vl.model.testing import hf_forward, make_case, pack_samples, stage_forward
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    config = get_preset(preset)
    hf = build_hf_model(config, dtype=torch.bfloat16)
    [model] = build_model_chunks(config, dtype=torch.bfloat16)
    load_full_state_dict(model, hf_to_mcore_state_dict(hf.state_dict(), config))
    sample = make_case("image_video", config)
    inputs = model_inputs(pack_samples([sample]))
    with torch.no_grad():
        ours = stage_forward(model, inputs)
        diff = float((ours.float() - hf_forward(hf, sample).logits[0].float()).abs().max())
    loss = stage_forward(model, inputs, with_labels=True)
    loss.sum().backward()
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return {"dtype": str(ours.dtype), "diff": diff, "loss_dtype": str(loss.dtype),
            "loss_finite": bool(torch.isfinite(loss).all()), "grads_finite": grads_finite}


@pytest.mark.parametrize("preset, tolerance", [("tiny", 1e-4), ("tiny-moe", 0.03)])
def test_bf16(preset, tolerance):
    result = run_distributed(_bf16_body, world_size=1, preset=preset)[0]
    assert result["dtype"] == "torch.bfloat16"
    assert result["diff"] <= tolerance  # measured: 0.0 dense, 0.015 MoE (expert sums in another order); bound = 2x measured
    assert result["loss_dtype"] == "torch.float32" and result["loss_finite"] and result["grads_finite"]
