"""Parity against transformers under tensor, pipeline and expert parallelism (real gloo ranks).

Layouts: TP2, PP2, PP2 x VPP2 (interleaved), TP2 with sequence parallelism, TP2·PP2 on 4 ranks (tiny); EP2
and TP2 with sequence parallelism (expert TP 2) for tiny-moe. The first pipeline stage holds 3 of the 4 tiny layers, since DeepStack
injects after layers 0, 1, 2. Each rank loads its share of the
transformers weights, the logits (gathered over TP, on the last stage) are compared for several inputs, and
one forward-backward through megatron's pipeline schedule is compared parameter by parameter against the
transformers gradients cut the same way. (Context parallelism is tested in tests/parallel.)
"""
from __future__ import annotations

import pytest
import torch

from qwen3vl.data.batch import IGNORE_INDEX
from qwen3vl_testing.distributed import run_distributed

LOGIT_TOL = 1e-4
GRAD_REL_TOL = 1e-5
CASES = ("image", "video", "text")


def _parallel_body(preset: str, tp: int, pp: int, ep: int, pipeline_layers=None, sequence_parallel=False,
                   vpp=None) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.hf_reference import build_hf_model
    from qwen3vl.model.interop.hf_weights import hf_to_mcore_state_dict
    from qwen3vl.model.presets import get_preset
    from qwen3vl.model.interop.state_dict_sharding import load_full_state_dict, shard_full_state_dict
    from qwen3vl_testing.model_cases import hf_forward, hf_token_loss, make_case, pack_samples, stage_forward
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.parallel.schedules import forward_backward_func

    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, sequence_parallel=sequence_parallel)
    initialize_parallel(layout)
    config = get_preset(preset)
    hf = build_hf_model(config)
    chunks = build_model_chunks(config, pipeline_layers=pipeline_layers, moe_aux_loss_coeff=0.0,
                                sequence_parallel=sequence_parallel)
    align = tp if sequence_parallel else 1  # sequence parallelism cuts every row into TP equal parts
    full = hf_to_mcore_state_dict(hf.state_dict(), config)
    for chunk in chunks:
        load_full_state_dict(chunk, full)
    result = {"logits": {}, "grads": {}, "losses": []}

    with torch.no_grad():
        # stage_forward sends one chunk's output to the next rank: not for interleaved (vpp) chunks.
        for case in CASES if vpp is None else ():
            [model] = chunks
            sample = make_case(case, config)
            ours = stage_forward(model, model_inputs(pack_samples([sample], pad_multiple=align)))
            if ours is not None:
                ref = hf_forward(hf, sample).logits[0]
                result["logits"][case] = float((ours[:len(ref)] - ref).abs().max())

    # One forward-backward of a packed row through megatron's schedule; the loss is the sum of token losses.
    # Text first: each sequence-parallel share then has unlabelled rows (pictures, padding), and the shares'
    # label counts differ (18 and 15 of 22 for the tiny model), so the shorter share is topped up.
    samples = [make_case("text", config, seed=5), make_case("image_video", config, seed=4)]
    batch = pack_samples(samples, pad_multiple=4, tail=4)
    inputs = model_inputs(batch)

    def forward_step(data_iterator, chunk):
        output = chunk(**next(data_iterator).model_kwargs())
        return output, lambda loss: (loss.sum(), {"loss": loss.sum().detach()})

    # The interleaved schedule needs a multiple of pp micro-batches: the same row, twice.
    micro_batches = pp if vpp else 1
    iterators = [iter([inputs] * micro_batches) for _ in chunks]
    # The rows this rank hands the output layer: only labelled ones (with sequence parallelism, as many as
    # the share with the most labels has, since the layer all-gathers equal shares).
    projected, last = [], chunks[-1]
    hook = last.output_layer.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[0])) \
        if last.post_process else None
    losses = forward_backward_func(layout)(
        forward_step_func=forward_step, data_iterator=iterators if vpp else iterators[0], model=chunks,
        num_microbatches=micro_batches, seq_length=inputs.schedule_seq_length, micro_batch_size=1)
    if hook is not None:
        hook.remove()
        labelled = batch.loss_mask().view(align, -1).sum(1)  # per sequence-parallel share (one without SP)
        result["projected_rows"] = (projected, [int(labelled.max())] * micro_batches, batch.seq_length // align)
    if sequence_parallel:
        # A micro-batch without a single label (a share of a row that is all picture): zero loss, and the
        # output layer still gets its zero gradient, which overlapped gradient reduction waits for.
        [model] = chunks
        saved = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad()
        no_labels = model_inputs(batch)
        no_labels.labels.fill_(IGNORE_INDEX)
        empty_loss = model(**no_labels.model_kwargs())
        empty_loss.sum().backward()
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
            else model.output_layer.weight
        result["no_labels"] = (float(empty_loss.abs().max()), weight.grad is not None
                               and float(weight.grad.abs().max()) == 0.0)
        for name, param in model.named_parameters():
            param.grad = saved[name]
    ref_loss = sum(hf_token_loss(hf_forward(hf, s).logits[0], s).sum() for s in samples)
    ref_loss.backward()
    result["losses"] = [(float(r["loss"]), float(ref_loss)) for r in losses]
    # QK-norm weights see only this rank's heads, and under sequence parallelism norms (and the router) only
    # this rank's tokens: megatron's finalize_model_grads sums those gradients over TP, as done here.
    ref_full = hf_to_mcore_state_dict(
        {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in hf.named_parameters()}, config)
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name or getattr(param, "sequence_parallel", False):
                dist.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
        ref_local = shard_full_state_dict(chunk, ref_full)
        for name, param in chunk.named_parameters():
            ref = ref_local[name]  # the schedule averages the (equal) micro-batch losses
            if ".local_experts." in name:
                ref = ref * parallel_state.get_data_parallel_world_size()  # every EP rank fed the same tokens
            ours = param.grad if param.grad is not None else torch.zeros_like(param)
            result["grads"][f"chunk{index}.{name}"] = (float((ours - ref).abs().max()), float(ref.abs().max()))
    return result


LAYOUTS = {
    "tp2": dict(preset="tiny", world=2, tp=2, pp=1, ep=1),
    "pp2": dict(preset="tiny", world=2, tp=1, pp=2, ep=1, pipeline_layers=(3, 1)),
    "ep2-moe": dict(preset="tiny-moe", world=2, tp=1, pp=1, ep=2),
    "tp2-sp": dict(preset="tiny", world=2, tp=2, pp=1, ep=1, sequence_parallel=True),
    "tp2-sp-moe": dict(preset="tiny-moe", world=2, tp=2, pp=1, ep=1, sequence_parallel=True),
    "pp2-vpp2": dict(preset="tiny", world=2, tp=1, pp=2, vpp=2, ep=1, pipeline_layers=(3, 0, 0, 1)),
    "tp2pp2": dict(preset="tiny", world=4, tp=2, pp=2, ep=1, pipeline_layers=(3, 1)),
}


_results: dict[str, list] = {}


@pytest.fixture
def ranks(request):
    """Per-rank results for one layout, computed once per test session."""
    if request.param not in _results:
        spec = dict(LAYOUTS[request.param])
        world = spec.pop("world")
        _results[request.param] = run_distributed(_parallel_body, world_size=world, timeout=300, **spec)
    return _results[request.param]


# Interleaved (vpp) chunks cannot be run stage by stage outside the schedule: their logits are not compared,
# their losses and gradients are.
@pytest.mark.parametrize("ranks", [name for name, spec in LAYOUTS.items() if "vpp" not in spec], indirect=True)
def test_logits_match_transformers(ranks):
    compared = [r["logits"] for r in ranks if r["logits"]]
    assert compared, "no rank produced logits"
    for logits in compared:
        assert set(logits) == set(CASES)
        for case, diff in logits.items():
            assert diff <= LOGIT_TOL, case


@pytest.mark.parametrize("ranks", list(LAYOUTS), indirect=True)
def test_schedule_losses_match_transformers(ranks):
    losses = [pair for r in ranks for pair in r["losses"]]
    assert losses, "no rank reported a loss"
    for ours, ref in losses:
        assert abs(ours - ref) <= LOGIT_TOL * max(1.0, abs(ref))


@pytest.mark.parametrize("ranks", list(LAYOUTS), indirect=True)
def test_only_labelled_rows_reach_the_output_layer(ranks):
    reported = [r["projected_rows"] for r in ranks if "projected_rows" in r]
    assert reported, "no rank ran the output layer"
    for projected, expected, share in reported:
        assert 0 < expected[0] < share  # fewer rows than the share: a full projection would show
        assert projected == expected


@pytest.mark.parametrize("ranks", [name for name, spec in LAYOUTS.items() if spec.get("sequence_parallel")],
                         indirect=True)
def test_a_micro_batch_without_labels_has_zero_loss_and_a_zero_output_gradient(ranks):
    assert [r["no_labels"] for r in ranks] == [(0.0, True)] * len(ranks)


@pytest.mark.parametrize("ranks", list(LAYOUTS), indirect=True)
def test_gradients_match_transformers(ranks):
    checked = 0
    for rank in ranks:
        for name, (diff, scale) in rank["grads"].items():
            assert diff <= GRAD_REL_TOL * max(scale, 1e-3), f"{name}: |diff| {diff:.3e}, |ref| {scale:.3e}"
            checked += scale > 0
    assert checked > 20, "too few parameters with a gradient were compared"
