"""What the GPU tests and the device check (benchmarks/gpu_check.sh) share: the closeness rules for a GPU,
moving model inputs to a device, and the tiny model's outputs on this process's device.

On a GPU, bf16 results of two correct implementations differ by reduction order (cuBLAS split-K, flash
attention's tiling) at the level of bf16's rounding, so a max-abs bound set on the CPU (where both sides
ran the same SDPA in the same order: difference 0.0) cannot hold there. GPU tests compare with the
relative error of the whole tensor, ||a - b|| / ||b||, which does not depend on the logits' scale and is
not dominated by one large entry.
"""
from __future__ import annotations


import pytest
import torch

gpu = pytest.mark.gpu  # tests/conftest.py: skipped unless pytest runs with --gpu

# fp32 on a GPU (TF32 off) against the CPU: the CPU suite's own bound for logits against transformers.
FP32_LOGIT_TOL = 1e-4
# bf16 against bf16 with the same casts (ours vs transformers, both on the GPU): only the order of
# reductions differs. bf16's unit roundoff is 2^-8 = 3.9e-3; a few such errors per logit, not a drift.
BF16_SAME_CASTS_REL_TOL = 1e-2
# bf16 against an fp32 reference: every parameter, activation and matmul input rounded to bf16 through the
# tiny model's 4 LLM layers and 4 ViT blocks. Measured on the CPU (SDPA in bf16): 0.007-0.009 for the five
# rows of tests/model/test_model_gpu.py. Not yet measured on a GPU; the first GPU run records it, and the
# bound becomes twice the larger of the two.
BF16_VS_FP32_REL_TOL = 2e-2
# A packed attention block in bf16 against float64: inputs and output rounded to bf16 once each.
BF16_ATTENTION_REL_TOL = 1e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64, on the CPU."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


CASES = ("image", "images", "video", "text")
GRAD_NAMES = ("vision.patch_embed.proj.weight", "vision.layers.0.self_attention.linear_qkv.weight",
              "embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
              "decoder.final_layernorm.weight", "output_layer.weight")


def tiny_rows(config) -> dict:
    """The rows compared: one per case, and a packed row of three samples with alignment and a tail."""
    from qwen3vl_testing.model_cases import make_case, pack_samples

    rows = {name: pack_samples([make_case(name, config)]) for name in CASES}
    samples = [make_case("image", config, seed=1), make_case("text", config, seed=2),
               make_case("video", config, seed=3)]
    rows["packed"] = pack_samples(samples, pad_multiple=4, tail=8)
    return rows


def tiny_model_outputs(preset: str, dtype_name: str, state: dict | None = None) -> dict:
    """On this process's device (the GPU if one is visible, else the CPU), after ``initialize_parallel``:
    logits of every ``tiny_rows`` row, the per-token loss of one row and the gradients of ``GRAD_NAMES``.

    ``state``: weights to load (another device's ``state``); None keeps this build's own and returns them.
    ``param_devices``: where ``build_model_chunks`` left the parameters, before they are moved."""
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl_testing.model_cases import make_case, named_config, pack_samples

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity must not run on TF32
    torch.backends.cudnn.allow_tf32 = False
    config = named_config(preset)
    [model] = build_model_chunks(config, getattr(torch, dtype_name), moe_aux_loss_coeff=0.0)
    param_devices = sorted({p.device.type for p in model.parameters()})
    model.to(device)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
    result = {"param_devices": param_devices, "logits": {},
              "state": None if state is not None else {k: v.detach().cpu().clone() for k, v in
                                                       model.state_dict().items() if isinstance(v, torch.Tensor)}}
    with torch.no_grad():
        for name, batch in tiny_rows(config).items():
            inputs = model_inputs(batch).to(device)
            result["logits"][name] = model(**inputs.model_kwargs(with_labels=False)).float().cpu()
    batch = pack_samples([make_case("image_video", config, seed=4), make_case("text", config, seed=5)],
                         pad_multiple=4, tail=4)
    loss = model(**model_inputs(batch).to(device).model_kwargs())
    loss.sum().backward()
    params = dict(model.named_parameters())
    result["loss"] = loss.detach().float().cpu()
    result["grads"] = {n: params[n].grad.detach().float().cpu() for n in GRAD_NAMES}
    return result
