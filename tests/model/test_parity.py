"""Single-rank parity of our megatron Qwen3-VL against transformers (tiny and tiny-moe, fp32, random weights).

Everything runs in one call on a 1-rank worker of the persistent pool (transformers and megatron are
imported once there); the tests below read the measured differences from a module-scoped fixture.
"""
from __future__ import annotations

import pytest
import torch

from qwen3vl.data.batch import IGNORE_INDEX
from qwen3vl_testing.distributed import run_distributed

LOGIT_TOL = 1e-4
# Gradients differ in scale by orders of magnitude between parameters: compare relative to the largest entry
# (measured: ~1e-6 for every checked parameter).
GRAD_REL_TOL = 1e-5
CASES = ("image", "images", "video", "text")
# A few parameters of each part, by transformers name (dense, MoE): patch embedding, position table,
# ViT attention and MLP, final and DeepStack mergers, token embedding, LLM attention, QK-norm, MLP / experts
# and router, final norm, output layer.
GRAD_KEYS = (
    "model.visual.patch_embed.proj.weight", "model.visual.pos_embed.weight",
    "model.visual.blocks.0.attn.qkv.weight", "model.visual.blocks.3.mlp.linear_fc2.bias",
    "model.visual.merger.linear_fc1.weight", "model.visual.deepstack_merger_list.1.norm.weight",
    "model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.language_model.layers.2.self_attn.k_norm.weight", "model.language_model.norm.weight",
)
DENSE_GRAD_KEYS = ("model.language_model.layers.1.mlp.gate_proj.weight",)
MOE_GRAD_KEYS = ("model.language_model.layers.1.mlp.experts.gate_up_proj",
                 "model.language_model.layers.3.mlp.experts.down_proj", "model.language_model.layers.1.mlp.gate.weight")


# Selective recompute of everything megatron can redo in our layers (recompute_modules), by preset kind.
SELECTIVE = {"dense": ["core_attn", "layernorm", "mlp"], "moe": ["core_attn", "layernorm", "moe"]}


def _parity_body(preset: str, recompute: str = "") -> dict:
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.hf_reference import build_hf_model
    from qwen3vl.model.interop.hf_weights import hf_to_mcore_state_dict, mcore_to_hf_state_dict
    from qwen3vl.model.interop.state_dict_sharding import load_full_state_dict
    from qwen3vl_testing.model_cases import (hf_forward, hf_token_loss, make_case, named_config, pack_samples,
                                       real_positions, stage_forward)
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    config = named_config(preset)
    hf = build_hf_model(config)
    # No router aux loss here: transformers adds none without output_router_logits (tested separately).
    # Full activation recompute re-runs every layer in backward: DeepStack features must survive it.
    # Selective recompute re-runs the named parts (the norms' outputs are dropped in place, then refilled).
    overrides = {"": {}, "recompute": dict(recompute_granularity="full", recompute_method="uniform",
                                           recompute_num_layers=1),
                 "selective": dict(recompute_granularity="selective",
                                   recompute_modules=SELECTIVE["moe" if config.is_moe else "dense"])}[recompute]
    [model] = build_model_chunks(config, moe_aux_loss_coeff=0.0, **overrides)
    full = hf_to_mcore_state_dict(hf.state_dict(), config)
    load_full_state_dict(model, full)
    result = {"logits": {}, "unmatched_names": set(full) ^ {n for n, _ in model.named_parameters()}}
    with torch.no_grad():
        for case in CASES:
            sample = make_case(case, config)
            ours = stage_forward(model, model_inputs(pack_samples([sample])))
            result["logits"][case] = float((ours - hf_forward(hf, sample).logits[0]).abs().max())
        # A packed row of three samples (aligned to 4, plus an empty tail segment) vs each run alone.
        samples = [make_case("image", config, seed=1), make_case("text", config, seed=2),
                   make_case("video", config, seed=3)]
        batch = pack_samples(samples, pad_multiple=4, tail=8)
        ours = stage_forward(model, model_inputs(batch))
        result["logits"]["packed"] = max(
            float((ours[rows] - hf_forward(hf, s).logits[0]).abs().max())
            for s, rows in zip(samples, real_positions(batch)))

    # Loss and gradients: a row with an image+video sample and a text sample, summed token losses.
    samples = [make_case("image_video", config, seed=4), make_case("text", config, seed=5)]
    batch = pack_samples(samples, pad_multiple=4, tail=4)
    projected = []  # rows the output layer sees: only the labelled ones (visual tokens and padding have none)
    hook = model.output_layer.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[0]))
    ours_loss = stage_forward(model, model_inputs(batch), with_labels=True)
    hook.remove()
    result["projected_rows"] = (projected, int(batch.loss_mask().sum()), batch.seq_length)
    # A micro-batch without a single label (a CP rank's share of a row that is all picture): zero loss, and
    # the output layer still gets its (zero) gradient, which overlapped gradient reduction waits for.
    model.zero_grad()
    no_labels = model_inputs(batch)
    no_labels.labels.fill_(IGNORE_INDEX)
    empty_loss = stage_forward(model, no_labels, with_labels=True)
    empty_loss.sum().backward()
    weight = model.shared_embedding_or_output_weight()
    result["no_labels"] = (float(empty_loss.abs().max()), empty_loss.shape[0] == batch.seq_length,
                           weight.grad is not None and float(weight.grad.abs().max()) == 0.0)
    model.zero_grad()
    ours_loss.sum().backward()
    ref_losses = [hf_token_loss(hf_forward(hf, s).logits[0], s) for s in samples]
    sum(loss.sum() for loss in ref_losses).backward()
    rows = real_positions(batch)
    result["loss"] = max(float((ours_loss[r] - ref).abs().max()) for r, ref in zip(rows, ref_losses))
    # How often each part of the last layer runs in one forward and backward: twice where it is recomputed.
    layer = model.decoder.layers[-1]
    parts = {"layernorm": layer.input_layernorm, "pre_mlp_layernorm": layer.pre_mlp_layernorm,
             "core_attn": layer.self_attention.core_attention,
             "mlp": getattr(layer.mlp, "experts", layer.mlp)}  # an MoE layer recomputes inside: its experts
    runs = dict.fromkeys(parts, 0)
    hooks = [module.register_forward_hook(lambda *_, name=name: runs.__setitem__(name, runs[name] + 1))
             for name, module in parts.items()]
    stage_forward(model, model_inputs(batch), with_labels=True).sum().backward()
    for handle in hooks:
        handle.remove()
    result["runs"] = runs
    padding = torch.ones(batch.seq_length, dtype=torch.bool)
    padding[torch.cat(rows)] = False
    result["loss_at_padding"] = float(ours_loss[padding].abs().max())
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    ours_hf = mcore_to_hf_state_dict(grads, config)
    ref_hf = {n: p.grad for n, p in hf.named_parameters()}
    keys = GRAD_KEYS + (MOE_GRAD_KEYS if config.is_moe else DENSE_GRAD_KEYS)
    keys += () if config.tie_word_embeddings else ("lm_head.weight",)
    result["grads"] = {k: (ours_hf[k], ref_hf[k]) for k in keys}
    return result


@pytest.fixture(scope="module", params=["tiny", "tiny-moe", "tiny-tied", "tiny+recompute", "tiny+selective",
                                        "tiny-moe+selective"])
def parity(request):
    preset, _, extra = request.param.partition("+")
    return run_distributed(_parity_body, world_size=1, timeout=300, preset=preset, recompute=extra)[0]


def test_recompute_redoes_what_it_names_in_backward(parity, request):
    preset, _, extra = request.node.callspec.params["parity"].partition("+")
    every = {"layernorm", "pre_mlp_layernorm", "core_attn", "mlp"}
    parts = {"layernorm": {"layernorm", "pre_mlp_layernorm"}, "core_attn": {"core_attn"}, "mlp": {"mlp"},
             "moe": {"mlp"}}
    modules = SELECTIVE["moe" if preset == "tiny-moe" else "dense"] if extra == "selective" else []
    redone = every if extra == "recompute" else set().union(*(parts[m] for m in modules))
    assert parity["runs"] == {name: 2 if name in redone else 1 for name in every}


def test_converted_names_are_exactly_the_model_parameters(parity):
    assert parity["unmatched_names"] == set()


@pytest.mark.parametrize("case", CASES + ("packed",))
def test_logits_match_transformers(parity, case):
    assert parity["logits"][case] <= LOGIT_TOL


def test_per_token_loss_matches_transformers(parity):
    assert parity["loss"] <= LOGIT_TOL
    assert parity["loss_at_padding"] == 0.0


def test_a_micro_batch_without_labels_has_zero_loss_and_a_zero_output_gradient(parity):
    assert parity["no_labels"] == (0.0, True, True)


def test_only_labelled_rows_reach_the_output_layer(parity):
    projected, labelled, row = parity["projected_rows"]
    assert 0 < labelled < row
    assert projected == [labelled]


def test_gradients_match_transformers(parity):
    for name, (ours, ref) in parity["grads"].items():
        scale = float(ref.abs().max())
        assert scale > 0, f"{name}: the reference gradient is zero, the check would be empty"
        assert ours.shape == ref.shape, name
        assert float((ours - ref).abs().max()) <= GRAD_REL_TOL * scale, name
