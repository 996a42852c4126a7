"""The MoE load-balancing loss goes through megatron's mechanism with the config's coefficient, per layer
E · Σ_e f_e · P_e over the real tokens only (padding left out), and it reaches the router gradients."""
from __future__ import annotations

import pytest
import torch

from qwen3vl_testing.distributed import run_distributed


def _aux_loss_body() -> dict:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.hf_reference import build_hf_model
    from qwen3vl.model.interop.hf_weights import hf_to_mcore_state_dict
    from qwen3vl.model.presets import get_preset
    from qwen3vl.model.interop.state_dict_sharding import load_full_state_dict
    from qwen3vl_testing.model_cases import make_case, pack_samples
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    config = get_preset("tiny-moe")
    full = hf_to_mcore_state_dict(build_hf_model(config).state_dict(), config)
    batch = pack_samples([make_case("image", config, seed=1), make_case("text", config, seed=2)],
                         pad_multiple=4, tail=8)
    real = batch.real_token_mask()
    router_grads, result = {}, {}
    for coefficient in (config.text.router_aux_loss_coef, 0.0):
        [model] = build_model_chunks(config, moe_aux_loss_coeff=coefficient)
        load_full_state_dict(model, full)
        model.train()
        routed = {}
        for layer in model.decoder.layers:
            layer.mlp.router.register_forward_hook(
                lambda module, args, out, n=layer.layer_number: routed.__setitem__(n, args[0].detach()))
        get_moe_layer_wise_logging_tracker().clear()
        model(**model_inputs(batch).model_kwargs()).sum().backward()
        router_grads[coefficient] = torch.stack([l.mlp.router.weight.grad for l in model.decoder.layers])
        if coefficient:
            result["coefficient"] = model.config.moe_aux_loss_coeff
            tracked = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
            result["tracked"] = tracked.tolist()
            expected = []
            k, experts = config.text.num_experts_per_tok, config.text.num_experts
            for layer in model.decoder.layers:
                x = routed[layer.layer_number].squeeze(1)[real]
                probs = torch.softmax(x @ layer.mlp.router.weight.T, dim=-1)
                chosen = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=-1).indices, 1.0)
                f = chosen.sum(0) / (k * x.shape[0])
                expected.append(float(experts * (f * probs.mean(0)).sum()))
            result["expected"] = expected
    result["router_grad_change"] = float((router_grads[config.text.router_aux_loss_coef] - router_grads[0.0]).abs().max())
    return result


@pytest.fixture(scope="module")
def aux():
    return run_distributed(_aux_loss_body, world_size=1)[0]


def test_coefficient_comes_from_the_config(aux):
    assert aux["coefficient"] == 0.001


def test_load_balancing_loss_per_layer_over_real_tokens(aux):
    assert len(aux["tracked"]) == len(aux["expected"]) == 4
    assert aux["tracked"] == pytest.approx(aux["expected"], rel=1e-5)


def test_aux_loss_reaches_the_router(aux):
    assert aux["router_grad_change"] > 0
