"""PackedCoreAttention (single rank) against a dense float64 reference with a block-diagonal mask, the GPU
kernels' calls (through CPU stand-ins), the capability probes and the kernel choice."""
import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen3vl.model import attention_support
from qwen3vl.model.attention import PackedCoreAttention, core_attention_class
from qwen3vl.parallel.micro_batch import build_packed_seq_params
from qwen3vl.model.attention_support import varlen_support
from qwen3vl_testing.attention_reference import dense_packed_attention, packed_attention_mask

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
# Segments of different lengths with alignment padding, an all-padding segment and a padding tail.
REAL = [5, 0, 7, 3, 1, 0]
PADDED = [8, 4, 8, 4, 4, 4]


def cumulative(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def make_attention(mask_type, **kwargs):
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=HEADS, num_query_groups=KV_HEADS,
                               kv_channels=HEAD_DIM, attention_dropout=0.0, hidden_dropout=0.0,
                               use_cpu_initialization=True)
    return PackedCoreAttention(config, 1, mask_type, "self", **kwargs)


def random_qkv(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(rows, HEADS, HEAD_DIM), (rows, KV_HEADS, HEAD_DIM), (rows, KV_HEADS, HEAD_DIM)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.padding_causal,
                                       AttnMaskType.no_mask, AttnMaskType.padding])
def test_matches_dense_reference_forward_and_backward(mask_type):
    cu, cu_padded = cumulative(REAL), cumulative(PADDED)
    q, k, v = random_qkv(int(cu_padded[-1]))
    params = build_packed_seq_params(cu, cu_padded)
    out = make_attention(mask_type, kernel="sdpa")(q, k, v, None, packed_seq_params=params)

    causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
    ref_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = dense_packed_attention(*ref_inputs, packed_attention_mask(cu, cu_padded, causal))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)

    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    for mine, theirs in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)


def attend_default_row(mask_type):
    """The REAL/PADDED row through PackedCoreAttention: (attention, params, (q, k, v), output, real rows)."""
    cu, cu_padded = cumulative(REAL), cumulative(PADDED)
    qkv = random_qkv(int(cu_padded[-1]))
    params = build_packed_seq_params(cu, cu_padded)
    attention = make_attention(mask_type)
    real_rows = packed_attention_mask(cu, cu_padded, causal=False).diagonal()
    return attention, params, qkv, attention(*qkv, None, packed_seq_params=params), real_rows


def test_padding_queries_output_zero_and_padding_keys_are_ignored():
    attention, params, (q, k, v), out, real_rows = attend_default_row(AttnMaskType.causal)
    assert torch.isfinite(out).all()
    assert (out[~real_rows] == 0).all() and (out[real_rows] != 0).any()
    out.sum().backward()
    for x in (q, k, v):
        assert (x.grad[~real_rows] == 0).all() and torch.isfinite(x.grad).all()

    # Garbage (even inf / nan) in padding key/value rows must not reach any output.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~real_rows], v2[~real_rows] = float("inf"), float("nan")
    out2 = attention(q, k2, v2, None, packed_seq_params=params)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_no_leakage_across_segments():
    attention, params, (q, k, v), out, _ = attend_default_row(AttnMaskType.no_mask)
    cu_padded = cumulative(PADDED)

    start, end = int(cu_padded[2]), int(cu_padded[3])  # the 7-token segment
    perturbed = [x.detach().clone() for x in (q, k, v)]
    for x in perturbed:
        x[start:end] += 1.0
    out2 = attention(*perturbed, None, packed_seq_params=params)
    outside = torch.ones(out.shape[0], dtype=torch.bool)
    outside[start:end] = False
    torch.testing.assert_close(out2[outside], out[outside], rtol=0, atol=0)
    assert not torch.allclose(out2[start:start + REAL[2]], out[start:start + REAL[2]])


def test_equal_length_segments_share_one_kernel_call():
    """ViT frame groups of one video have equal length: one batched SDPA call, not one per segment."""
    cu = cumulative([6] * 5 + [2])
    params = build_packed_seq_params(cu, cu)
    q, k, v = random_qkv(int(cu[-1]))
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        make_attention(AttnMaskType.no_mask, kernel="sdpa")(q, k, v, None, packed_seq_params=params)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert sorted(calls) == [1, 5]


def test_unpacked_sbhd_input_is_causal_attention():
    rows = 6
    q, k, v = (x.detach().unsqueeze(1) for x in random_qkv(rows))  # [s, b=1, heads, hd]
    out = make_attention(AttnMaskType.causal)(q, k, v, None)
    cu = cumulative([rows])
    ref = dense_packed_attention(q[:, 0], k[:, 0], v[:, 0], packed_attention_mask(cu, cu, causal=True))
    assert out.shape == (rows, 1, HEADS * HEAD_DIM)
    torch.testing.assert_close(out[:, 0], ref, rtol=0, atol=1e-12)


def test_build_packed_seq_params_and_selection():
    params = build_packed_seq_params(torch.tensor([0, 3, 5]), torch.tensor([0, 4, 8]))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == 4 and isinstance(params.max_seqlen_q, int)
    assert params.cu_seqlens_kv_padded.tolist() == [0, 4, 8]
    assert core_attention_class("local") is PackedCoreAttention
    assert core_attention_class("sdpa").keywords == {"kernel": "sdpa"}
    if varlen_support().usable:
        assert core_attention_class("varlen").keywords == {"kernel": "varlen"}
    else:  # refused when the spec is built, not in the first forward, with the probe's reason
        with pytest.raises(ValueError, match="cannot run here: .*CUDA"):
            core_attention_class("varlen")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        make_attention(AttnMaskType.causal, kernel="flash9")


def _flash_loop(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size):
    """flash's conventions, one sequence at a time: causal via window_size=(-1, 0), aligned bottom-right when
    a sequence has more keys than queries, fewer K/V heads than query heads read as GQA."""
    assert window_size in ((-1, 0), (-1, -1)) and cu_q.dtype == cu_k.dtype == torch.int32
    out = []
    for i in range(cu_q.numel() - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ki, vi = (x[cu_k[i]:cu_k[i + 1]].transpose(0, 1) for x in (k, v))
        assert qi.shape[1] <= max_q and ki.shape[1] <= max_k
        mask = None
        if window_size == (-1, 0):
            mask = torch.ones(qi.shape[1], ki.shape[1], dtype=torch.bool).tril(ki.shape[1] - qi.shape[1])
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                                             enable_gqa=qi.shape[0] != ki.shape[0])
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def varlen_attn_2_13(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                     enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """A CPU stand-in with torch 2.12+'s signature: it refuses GQA unless enable_gqa is passed."""
    if not enable_gqa and q.shape[1] != k.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads. Try enable_gqa=True.")
    return _flash_loop(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)


def varlen_attn_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                     k_cache=None, v_cache=None, cache_seqlens=None, cache_batch_idx=None, page_table=None,
                     seqused_k=None):
    """torch 2.10/2.11's signature: no enable_gqa (passing it raises TypeError); flash takes GQA as is."""
    return _flash_loop(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)


def varlen_attn_2_9(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, is_causal=False):
    """torch 2.9's signature: none of scale, window_size, enable_gqa."""
    raise AssertionError("the probe must keep the kernel from calling this signature")


@pytest.fixture
def fake_varlen(monkeypatch):
    """Install a varlen_attn stand-in; the probe's cache is cleared before and after."""
    import torch.nn.attention.varlen as varlen_module

    def install(fn):
        monkeypatch.setattr(varlen_module, "varlen_attn", fn)
        attention_support.varlen_signature_support.cache_clear()

    yield install
    monkeypatch.undo()
    attention_support.varlen_signature_support.cache_clear()


@pytest.mark.parametrize("varlen_attn", [varlen_attn_2_13, varlen_attn_2_11], ids=["torch2.13", "torch2.11"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cp_size", [1, 2])
def test_varlen_kernel_feeds_flash_the_same_blocks(fake_varlen, varlen_attn, causal, cp_size):
    """The GPU varlen path (run here through CPU stand-ins of both torch signatures) equals the sdpa path, also
    for a context-parallel rank whose chunks read their segment's key prefix; with torch < 2.12 it must not
    pass enable_gqa (F3: TypeError at the first bf16 forward)."""
    from qwen3vl.model.attention_kernels import sdpa_packed, varlen_packed
    from qwen3vl.model.attention_plan import build_plan
    from qwen3vl.parallel.context_parallel import gathered_key_order, zigzag_index

    fake_varlen(varlen_attn)
    assert attention_support.varlen_signature_support().gqa_keyword == (varlen_attn is varlen_attn_2_13)
    real, padded = [13, 3, 8, 0], [16, 8, 8, 4]
    cu, cu_padded = cumulative(real), cumulative(padded)
    q, k, v = (x.detach() for x in random_qkv(int(cu_padded[-1])))
    for rank in range(cp_size):
        key_order = gathered_key_order(cu_padded, cp_size) if cp_size > 1 else None
        plan = build_plan(cu.tolist(), cu_padded.tolist(), causal=causal, cp_size=cp_size, cp_rank=rank,
                          key_order=key_order)
        local = zigzag_index(cu_padded, cp_size, rank)
        gathered = torch.cat([zigzag_index(cu_padded, cp_size, r) for r in range(cp_size)])
        args = (q[local], k[gathered], v[gathered], plan)
        torch.testing.assert_close(varlen_packed(*args, scale=0.3), sdpa_packed(*args, scale=0.3), rtol=0, atol=1e-12)


def test_varlen_probe_reads_the_signature(fake_varlen):
    """F3: availability means the keywords the kernel passes exist, not that the import works."""
    fake_varlen(varlen_attn_2_9)
    support = attention_support.varlen_signature_support()
    assert not support.usable and "scale, window_size" in support.reason
    assert not varlen_support(torch.device("cpu")).usable
    fake_varlen(varlen_attn_2_11)
    assert attention_support.varlen_signature_support() == attention_support.KernelSupport(True, gqa_keyword=False)
    assert "CUDA" in varlen_support(torch.device("cpu")).reason


def test_gpu_sdpa_calls_never_need_the_math_fallback():
    """F10: on CUDA, GQA with fp32 or with a bottom-right causal block repeats the K/V heads (no fused SDPA
    backend takes GQA with fp32 or a mask) and uses the lower-right causal bias instead of a dense mask;
    long blocks run with the math backend disabled. On CPU the calls stay as they were."""
    from qwen3vl.model.attention_kernels import MATH_MAX_PAIRS, sdpa_call_plan

    fp32, bf16 = torch.float32, torch.bfloat16
    assert sdpa_call_plan("cpu", fp32, True, True, 10 * MATH_MAX_PAIRS) == (False, False, False)
    assert sdpa_call_plan("cuda", bf16, True, False, 64) == (False, False, False)  # flash takes GQA itself
    assert sdpa_call_plan("cuda", fp32, True, False, 64) == (True, False, False)
    assert sdpa_call_plan("cuda", bf16, True, True, 64) == (True, True, False)
    assert sdpa_call_plan("cuda", fp32, False, True, 64) == (False, True, False)
    assert sdpa_call_plan("cuda", bf16, False, False, MATH_MAX_PAIRS + 1) == (False, False, True)


@pytest.mark.parametrize("cp_rank", [0, 1])
def test_gpu_sdpa_call_shapes_give_the_same_attention(monkeypatch, cp_rank):
    """The CUDA branch's calls (repeated K/V heads, lower-right causal bias) run here on CPU tensors and equal
    the CPU branch's dense-mask calls, on a context-parallel rank (rectangular causal blocks), fwd and bwd."""
    from qwen3vl.model import attention_kernels
    from qwen3vl.model.attention_plan import build_plan
    from qwen3vl.parallel.context_parallel import gathered_key_order, zigzag_index

    real, padded = [13, 3, 8, 0], [16, 8, 8, 4]
    cu, cu_padded = cumulative(real), cumulative(padded)
    plan = build_plan(cu.tolist(), cu_padded.tolist(), causal=True, cp_size=2, cp_rank=cp_rank,
                      key_order=gathered_key_order(cu_padded, 2))
    assert any(g.rectangular_causal for g in plan.groups)
    local = zigzag_index(cu_padded, 2, cp_rank)
    gathered = torch.cat([zigzag_index(cu_padded, 2, r) for r in range(2)])
    results = []
    for cuda_calls in (False, True):
        if cuda_calls:
            monkeypatch.setattr(attention_kernels, "sdpa_call_plan", lambda device, dtype, gqa, rect, pairs: (gqa, rect, False))
        q, k, v = random_qkv(int(cu_padded[-1]))
        out = attention_kernels.sdpa_packed(q[local], k[gathered], v[gathered], plan, scale=0.3)
        out.backward(torch.ones_like(out))
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for cpu_value, cuda_value in zip(*results):
        torch.testing.assert_close(cuda_value, cpu_value, rtol=0, atol=1e-12)


def test_transformer_engine_is_opt_in(monkeypatch):
    """F9: installing transformer-engine does not change the kernel; 'te' must be asked for, and is refused
    with the probe's reason where it cannot be built."""
    from qwen3vl.model import attention as attention_module
    from qwen3vl.model.attention_support import KernelSupport

    monkeypatch.setattr(attention_module, "transformer_engine_support", lambda: KernelSupport(True))
    assert core_attention_class("auto") is PackedCoreAttention
    monkeypatch.setattr(attention_module, "transformer_engine_support", lambda: KernelSupport(False, "no TE here"))
    with pytest.raises(ValueError, match="backend 'te' cannot be built: no TE here"):
        core_attention_class("te")


def test_transformer_engine_probe_needs_its_pytorch_module(monkeypatch):
    """F8: a transformer_engine package that imports is not enough; its pytorch module and class must."""
    import sys
    import types

    def probe(modules):
        for name in ("transformer_engine", "transformer_engine.pytorch"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        attention_support.transformer_engine_support.cache_clear()
        try:
            return attention_support.transformer_engine_support()
        finally:
            attention_support.transformer_engine_support.cache_clear()

    package = types.ModuleType("transformer_engine")
    package.__path__ = []  # a package without its compiled pytorch part
    support = probe({"transformer_engine": package})
    assert not support.usable and "transformer_engine.pytorch does not import" in support.reason
    support = probe({"transformer_engine": package, "transformer_engine.pytorch": types.ModuleType("pytorch")})
    assert not support.usable and "no DotProductAttention" in support.reason


def _plan_builds(recompute: str | None) -> dict:
    """Builds of the attention plan while the tiny model runs forward + backward on one row, then a second."""
    from qwen3vl.model import attention_plan
    from qwen3vl.model.attention import PackedCoreAttention
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.parallel.context_parallel import model_inputs
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl_testing.model_cases import make_case, named_config, pack_samples, stage_forward

    initialize_parallel(ParallelLayout())
    config = named_config("tiny")
    [model] = build_model_chunks(config, torch.float32, **({"recompute_granularity": recompute} if recompute else {}))
    builds, original = [], attention_plan.build_plan

    def counting(*args, **kwargs):
        builds.append("llm" if kwargs["causal"] else "vit")
        return original(*args, **kwargs)

    attention_plan.build_plan = counting
    try:
        loss = stage_forward(model, model_inputs(pack_samples([make_case("image", config)])), with_labels=True)
        loss.sum().backward()
        first = list(builds)
        stage_forward(model, model_inputs(pack_samples([make_case("image", config, seed=1)])), with_labels=True)
    finally:
        attention_plan.build_plan = original
    layers = {"llm": 0, "vit": 0}
    for name, module in model.named_modules():
        if isinstance(module, PackedCoreAttention):
            layers["vit" if name.startswith("vision") else "llm"] += 1
    return {"first": first, "all": builds, "layers": layers}


@pytest.mark.parametrize("recompute", [None, "selective"])
def test_attention_plan_is_built_once_per_micro_batch(recompute):
    """P3: every layer of a forward, and the recomputed attention in backward, reuse one plan per row and
    mask type (the LLM's causal one, the ViT's bidirectional one) instead of rebuilding indices per layer."""
    from qwen3vl_testing.distributed import run_distributed

    result = run_distributed(_plan_builds, world_size=1, recompute=recompute)[0]
    assert result["layers"]["llm"] >= 2 and result["layers"]["vit"] >= 2
    assert sorted(result["first"]) == ["llm", "vit"]
    assert sorted(result["all"]) == ["llm", "llm", "vit", "vit"]


def test_varlen_kernel_takes_its_indices_from_the_plan(fake_varlen):
    """P3: repeated layer calls on one plan hand the kernel the plan's own cu_seqlens (no per-call rebuild)."""
    from qwen3vl.model.attention_kernels import varlen_packed
    from qwen3vl.model.attention_plan import build_plan

    seen = []

    def recording(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen.append((cu_q, cu_k, max_q, max_k))
        return varlen_attn_2_13(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                enable_gqa=enable_gqa)

    fake_varlen(recording)
    cu, cu_padded = cumulative(REAL), cumulative(PADDED)
    plan = build_plan(cu.tolist(), cu_padded.tolist(), causal=True)
    q, k, v = (x.detach() for x in random_qkv(int(cu_padded[-1])))
    for _ in range(3):
        varlen_packed(q, k, v, plan, scale=0.3)
    assert all(a is plan.cu_seqlens_q and b is plan.cu_seqlens_k for a, b, _, _ in seen) and len(seen) == 3
    assert plan.cu_seqlens_q.tolist() == [0, 5, 12, 15, 16] and seen[0][2:] == (7, 7)
