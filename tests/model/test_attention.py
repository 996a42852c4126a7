"""PackedCoreAttention (single rank) against a dense float64 reference with a block-diagonal mask."""
import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen3vl.model.attention import PackedCoreAttention, build_packed_seq_params, core_attention_class
from qwen3vl.model.attention_kernels import varlen_available
from qwen3vl.model.attention_reference import dense_packed_attention, packed_attention_mask

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
    if varlen_available():
        assert core_attention_class("varlen").keywords == {"kernel": "varlen"}
    else:  # refused when the spec is built, not in the first forward
        with pytest.raises(ValueError, match="needs CUDA"):
            core_attention_class("varlen")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        make_attention(AttnMaskType.causal, kernel="flash9")


def flash_varlen_semantics(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """A loop-per-sequence stand-in for the CUDA-only varlen_attn with flash's conventions: causal via
    window_size=(-1, 0), aligned bottom-right when a sequence has more keys than queries."""
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
                                                             enable_gqa=enable_gqa)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cp_size", [1, 2])
def test_varlen_kernel_feeds_flash_the_same_blocks(monkeypatch, causal, cp_size):
    """The GPU varlen path (run here through a CPU stand-in of the kernel) equals the sdpa path, also for a
    context-parallel rank whose chunks read their segment's key prefix."""
    import torch.nn.attention.varlen as varlen_module
    from qwen3vl.model.attention_kernels import build_plan, sdpa_packed, varlen_packed
    from qwen3vl.parallel.context_parallel import gathered_key_order, zigzag_index

    monkeypatch.setattr(varlen_module, "varlen_attn", flash_varlen_semantics)
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
