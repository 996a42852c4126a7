"""Rows without media still give every vision-tower parameter a gradient, an exact zero, and change nothing else.

megatron's overlapped gradient reduction (the GPU default) needs every trainable parameter to get a gradient
on a step's last micro-batch. ``Qwen3VLModel`` runs its vision tower on a dummy image for a text-only row and
adds 0 · its outputs; here the loss and every LLM gradient of such a row are compared bitwise with a run whose
vision tower is frozen (no dummy), and the tower's gradients must exist and be exactly zero.
"""
from __future__ import annotations

import torch

from qwen3vl_testing.distributed import run_distributed


def _keepalive_body() -> dict:
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.presets import get_preset
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl_testing.model_cases import make_case, pack_samples, stage_forward

    initialize_parallel(ParallelLayout())
    config = get_preset("tiny")
    [model] = build_model_chunks(config)
    inputs = model_inputs(pack_samples([make_case("text", config, seed=1), make_case("text", config, seed=2)]))
    runs = {}
    for vision_trains in (True, False):
        for p in model.vision.parameters():
            p.requires_grad_(vision_trains)
        model.zero_grad(set_to_none=True)
        loss = stage_forward(model, inputs, with_labels=True)
        loss.sum().backward()
        runs[vision_trains] = (loss.detach().clone(), {n: None if p.grad is None else p.grad.clone()
                                                       for n, p in model.named_parameters()})
    (loss_on, grads_on), (loss_off, grads_off) = runs[True], runs[False]
    vision = [n for n in grads_on if n.startswith("vision.")]
    return {
        "same_loss": torch.equal(loss_on, loss_off),
        "vision_params": len(vision),
        "vision_grads_missing": [n for n in vision if grads_on[n] is None],
        "vision_grads_nonzero": [n for n in vision if grads_on[n] is not None and bool(grads_on[n].any())],
        "llm_grads_differ": [n for n in grads_on if n not in vision
                             and not torch.equal(grads_on[n], grads_off[n])],
        "llm_params": len(grads_on) - len(vision),
    }


def test_text_only_rows_give_the_vision_tower_zero_gradients_and_change_nothing_else():
    [result] = run_distributed(_keepalive_body, world_size=1, timeout=300)
    assert result["vision_params"] > 20 and result["llm_params"] > 10
    assert result["same_loss"]
    assert result["vision_grads_missing"] == [] and result["vision_grads_nonzero"] == []
    assert result["llm_grads_differ"] == []
