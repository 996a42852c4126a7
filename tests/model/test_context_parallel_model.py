"""The whole tiny Qwen3-VL under context parallelism (CP=2) against CP=1 on the same packed row.

Both runs happen in one call on 2 gloo ranks: first CP=1 (every rank computes the full row as the
reference), then CP=2 with the same weights on each rank's zig-zag rows, the images split across the two
ranks by cost. Logits and per-token losses must match on the local rows, and every parameter gradient,
summed over the CP group (as DDP does over dp_cp), must match the CP=1 gradient.

CI runs the dense tiny model at TP=1. The body takes ``preset``, ``tp`` and TransformerConfig overrides for
checks by hand, e.g. ``run_distributed(_cp_model_body, world_size=4, tp=2, sequence_parallel=True)``.
"""
from __future__ import annotations

import pytest
import torch

from qwen3vl_testing.distributed import run_distributed

LOGIT_TOL = 1e-5


def _cp_model_body(preset: str = "tiny", tp: int = 1, **overrides) -> dict:
    """``overrides`` go to the LLM's TransformerConfig (e.g. sequence_parallel, recompute settings)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.presets import get_preset
    from qwen3vl_testing.model_cases import make_case, pack_samples, stage_forward
    from qwen3vl.parallel.context_parallel import model_inputs, split_media_by_cost
    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    config = get_preset(preset)
    samples = [make_case("images", config, seed=1), make_case("text", config, seed=2),
               make_case("video", config, seed=3), make_case("image_video", config, seed=4)]
    pad_multiple = 2 * 2 * (tp if overrides.get("sequence_parallel") else 1)  # 2·CP, ×TP with sequence parallelism
    batch = pack_samples(samples, pad_multiple=pad_multiple, tail=pad_multiple)

    def forward_backward(model, inputs):
        logits = stage_forward(model, inputs).detach()
        loss = stage_forward(model, inputs, with_labels=True)
        loss.sum().backward()
        grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
        for name, param in model.named_parameters():
            if getattr(param, "sequence_parallel", False):  # norms see a sequence shard: megatron sums over TP
                dist.all_reduce(grads[name], group=parallel_state.get_tensor_model_parallel_group())
        return logits, loss.detach(), grads

    initialize_parallel(ParallelLayout(tp=tp, cp=1))
    torch.manual_seed(0)
    [reference] = build_model_chunks(config, **overrides)
    weights = reference.state_dict()  # no optimizer step: the weights stay as built
    ref_logits, ref_loss, ref_grads = forward_backward(reference, model_inputs(batch))
    destroy_parallel()

    initialize_parallel(ParallelLayout(tp=tp, cp=2))
    cp_rank = parallel_state.get_context_parallel_rank()
    [model] = build_model_chunks(config, **overrides)
    model.load_state_dict(weights)
    inputs = model_inputs(batch, cp_rank=cp_rank, cp_size=2)
    logits, loss, grads = forward_backward(model, inputs)
    rows = inputs.gather_index
    grad_errors = {}
    for name, grad in grads.items():
        dist.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        grad_errors[name] = (float((grad - ref_grads[name]).abs().max()), float(ref_grads[name].abs().max()))
    return {
        "logits": float((logits - ref_logits[rows]).abs().max()),
        "loss": float((loss - ref_loss[rows]).abs().max()),
        "local_loss_tokens": int((inputs.labels != -100).sum()),
        "local_visual_tokens": int((inputs.visual_index >= 0).sum()),
        "media_units": len(split_media_by_cost(batch.grid_thw, 2).units_of(cp_rank)),
        "grads": grad_errors,
    }


@pytest.fixture(scope="module")
def cp_results():
    return run_distributed(_cp_model_body, world_size=2, timeout=300)


def test_cp2_logits_and_loss_match_cp1_on_local_rows(cp_results):
    for rank in cp_results:
        assert rank["local_loss_tokens"] > 0 and rank["local_visual_tokens"] > 0 and rank["media_units"] > 0
        assert rank["logits"] <= LOGIT_TOL
        assert rank["loss"] <= LOGIT_TOL


def test_cp2_gradients_summed_over_cp_match_cp1(cp_results):
    grads = cp_results[0]["grads"]
    assert any(name.startswith("vision.") and scale > 0 for name, (_, scale) in grads.items())
    for name, (error, scale) in grads.items():
        assert error <= 1e-6 + 1e-4 * scale, f"{name}: max |CP2 - CP1| = {error:.3g} (max |grad| {scale:.3g})"
