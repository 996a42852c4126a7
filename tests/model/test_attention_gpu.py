"""Packed attention on a GPU (``python -m pytest --gpu tests/model``; skipped elsewhere).

The probes' answers on this machine; varlen and sdpa in bf16 against a float64 reference, forward and
backward, also for context-parallel ranks; fp32 SDPA with grouped-query K/V without the math backend's
[heads, s, s] memory; and transformer-engine against ours, the parity that must pass before TE may become
a default (F9).
"""
from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from qwen3vl_testing.attention_reference import dense_packed_attention, packed_attention_mask
from qwen3vl_testing.gpu import BF16_ATTENTION_REL_TOL, gpu, relative_error

pytestmark = gpu
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128  # the 2B's LLM attention
# Unequal segments (multiples of 2·CP after padding), a short one, and an all-padding tail.
REAL, PADDED = [300, 1000, 77, 0], [304, 1000, 80, 16]


def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def cumulative(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def test_probes_pick_flash_varlen_for_half_precision():
    from qwen3vl.model.attention_kernels import resolve_kernel
    from qwen3vl.model.attention_support import varlen_signature_support, varlen_support

    support = varlen_support(cuda())
    assert support.usable, support.reason
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert varlen_signature_support().gqa_keyword == (version >= (2, 12))
    assert resolve_kernel("auto", torch.bfloat16, device=cuda()) == "varlen"
    assert resolve_kernel("auto", torch.float32, device=cuda()) == "sdpa"
    assert resolve_kernel("auto", torch.bfloat16, device=torch.device("cpu")) == "sdpa"


@pytest.mark.parametrize("kernel", ["varlen", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cp_size", [1, 2])
def test_kernels_match_float64_reference_in_bf16(kernel, causal, cp_size):
    """Every CP rank's output, and the gradients of all ranks together, against one dense float64 row."""
    from qwen3vl.model.attention_kernels import KERNELS
    from qwen3vl.model.attention_plan import build_plan
    from qwen3vl.parallel.context_parallel import gathered_key_order, zigzag_index

    cu, cu_padded = cumulative(REAL), cumulative(PADDED)
    rows = int(cu_padded[-1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, h, HEAD_DIM, generator=g, dtype=torch.float64).to(cuda())
               for h in (HEADS, KV_HEADS, KV_HEADS))
    upstream = torch.randn(rows, HEADS, HEAD_DIM, generator=g, dtype=torch.float64).to(cuda())
    ref_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    scale = 1.0 / math.sqrt(HEAD_DIM)
    allowed = packed_attention_mask(cu, cu_padded, causal).to(cuda())
    reference = dense_packed_attention(*ref_inputs, allowed, scale=scale).view(rows, HEADS, HEAD_DIM)
    (reference * upstream).sum().backward()

    ours = [x.to(cuda(), torch.bfloat16).requires_grad_() for x in (q, k, v)]
    key_order = gathered_key_order(cu_padded, cp_size) if cp_size > 1 else None
    gathered = torch.cat([zigzag_index(cu_padded, cp_size, r) for r in range(cp_size)]).to(cuda())
    total = 0
    for rank in range(cp_size):
        plan = build_plan(cu.tolist(), cu_padded.tolist(), causal=causal, cp_size=cp_size, cp_rank=rank,
                          key_order=key_order, device=cuda())
        local = zigzag_index(cu_padded, cp_size, rank).to(cuda())
        out = KERNELS[kernel](ours[0][local], ours[1][gathered], ours[2][gathered], plan, scale=scale)
        assert relative_error(out, reference[local]) <= BF16_ATTENTION_REL_TOL
        total = total + (out.double() * upstream[local]).sum()
    total.backward()
    for mine, theirs in zip(ours, ref_inputs):
        assert relative_error(mine.grad, theirs.grad) <= BF16_ATTENTION_REL_TOL


def _extra_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("dtype, seq, cp_size", [(torch.float32, 8192, 1), (torch.bfloat16, 16384, 2)])
def test_sdpa_at_length_runs_fused_without_quadratic_memory(dtype, seq, cp_size):
    """F10: fp32 with GQA, and CP's bottom-right causal blocks, used to fall back to SDPA's math backend,
    which holds [heads, q, k] probabilities (4 GiB at 8K in fp32). With math disabled the call must still
    run, and its extra memory must stay far below what math would hold."""
    from torch.nn.attention import sdpa_kernel

    from qwen3vl.model.attention_kernels import FUSED_SDPA_BACKENDS, sdpa_packed
    from qwen3vl.model.attention_plan import build_plan
    from qwen3vl.parallel.context_parallel import gathered_key_order

    cu = cumulative([seq])
    plan = build_plan(cu.tolist(), cu.tolist(), causal=True, cp_size=cp_size, cp_rank=0,
                      key_order=gathered_key_order(cu, cp_size) if cp_size > 1 else None, device=cuda())
    q = torch.randn(seq // cp_size, HEADS, HEAD_DIM, device=cuda(), dtype=dtype, requires_grad=True)
    k = torch.randn(seq, KV_HEADS, HEAD_DIM, device=cuda(), dtype=dtype, requires_grad=True)
    v = torch.randn(seq, KV_HEADS, HEAD_DIM, device=cuda(), dtype=dtype, requires_grad=True)

    def step():
        with sdpa_kernel(FUSED_SDPA_BACKENDS):  # a math fallback raises instead of running
            sdpa_packed(q, k, v, plan, scale=1.0 / math.sqrt(HEAD_DIM)).float().sum().backward()

    step()  # warm-up: kernel selection and workspaces
    largest_block = max(group.q_len * group.k_len for group in plan.groups)
    math_probabilities = HEADS * largest_block * torch.finfo(dtype).bits // 8
    assert _extra_peak_bytes(step) < math_probabilities / 2


def _te_against_ours(rows: list) -> list:
    """On one GPU rank: TEDotProductAttention and PackedCoreAttention on the same THD rows, bf16."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.transformer_config import TransformerConfig

    from qwen3vl.model.attention import PackedCoreAttention
    from qwen3vl.parallel.micro_batch import build_packed_seq_params
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=KV_HEADS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                               bf16=True, params_dtype=torch.bfloat16)
    mask = AttnMaskType.padding_causal
    te = TEDotProductAttention(config, layer_number=1, attn_mask_type=mask, attention_type="self")
    ours = PackedCoreAttention(config, 1, mask, "self")
    errors = []
    for real, padded in rows:
        cu, cu_padded = cumulative(real).cuda(), cumulative(padded).cuda()
        params = build_packed_seq_params(cu, cu_padded)
        total = int(cu_padded[-1])
        g = torch.Generator(device="cuda").manual_seed(0)
        qkv = [torch.randn(total, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
               for h in (HEADS, KV_HEADS, KV_HEADS)]
        upstream = torch.randn(total, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        real_rows = packed_attention_mask(cu.cpu(), cu_padded.cpu(), causal=False).diagonal().cuda()
        results = []
        for module in (te, ours):
            inputs = [x.clone().requires_grad_() for x in qkv]
            out = module(*inputs, None, attn_mask_type=mask, packed_seq_params=params).reshape(total, -1)
            (out[real_rows] * upstream[real_rows]).sum().backward()
            results.append([out[real_rows]] + [x.grad[real_rows] for x in inputs])
        errors.append([relative_error(a, b) for a, b in zip(*results)])
    return errors


def test_transformer_engine_matches_packed_core_attention():
    """F9: the gate for making TE a default. Rows with padding between segments, a row that its last sample
    fills exactly, and a row with a padding tail (TransformerEngine#3331's shapes, without CP here)."""
    from qwen3vl.model.attention_support import transformer_engine_support
    from qwen3vl_testing.distributed import run_distributed

    support = transformer_engine_support()
    if not support.usable:
        pytest.skip(support.reason)
    rows = [([300, 1000, 77, 0], [304, 1000, 80, 16]), ([512, 512], [512, 512]), ([1021, 0], [1024, 64])]
    for row_errors in run_distributed(_te_against_ours, world_size=1, device="cuda", rows=rows)[0]:
        assert max(row_errors) <= BF16_ATTENTION_REL_TOL, row_errors
