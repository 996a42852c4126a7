"""Attention kernels for packed (THD) rows, each driven by one ``AttentionPlan`` (``attention_plan.py``), and
the choice between them.

Kernels (same contract: query [Tq, Hq, D], key/value [Tk, Hkv, D] -> [Tq, Hq, D], zeros at padding rows):
  * ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash varlen, CUDA, half precision, no dropout).
                One call for the whole row; causal via ``window_size=(-1, 0)``, whose bottom-right alignment
                is exactly what context-parallel chunks need. O(T) memory.
  * ``sdpa``  : blocks of equal shape are batched into one ``F.scaled_dot_product_attention`` call, so the
                Python loop runs over distinct shapes, not over samples (ViT frame groups of one image or
                video all share a shape). Exact on CPU; on a GPU it must reach a fused SDPA backend (below).

Choosing (``resolve_kernel``): ``auto`` takes varlen for half-precision CUDA tensors without dropout where
the probe (``attention_support.varlen_support``) says this torch and GPU can run it, else sdpa. A kernel
asked for by name that cannot run is refused with the probe's reason.

SDPA on a GPU never falls back to the O(s²) math backend at length. No fused backend takes grouped-query
K/V together with fp32 (flash has no fp32; memory-efficient has no GQA) or with an attention mask, and
SDPA's silent fallback stores [heads, s, s] fp32 probabilities (4 GiB per layer at 8K). So on CUDA the
K/V heads are repeated in exactly those cases, bottom-right causal blocks use SDPA's lower-right causal
bias instead of a dense mask, and blocks of more than ``MATH_MAX_PAIRS`` query-key pairs run with the math
backend disabled, so a shape no fused backend takes fails with a message instead of running out of memory.
On CPU the calls are what they always were (numerics unchanged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from qwen3vl.model.attention_plan import AttentionPlan, BlockGroup
from qwen3vl.model.attention_support import varlen_signature_support, varlen_support

# Above this many query-key pairs per block (a 2K x 2K block), SDPA on a GPU may not use the math backend.
MATH_MAX_PAIRS = 2048 * 2048
FUSED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
HALF = (torch.float16, torch.bfloat16)


def sdpa_call_plan(device_type: str, dtype: torch.dtype, gqa: bool, rectangular_causal: bool,
                   pairs: int) -> tuple[bool, bool, bool]:
    """How one block group calls SDPA: (repeat K/V heads, lower-right causal bias, math backend disabled).

    On CPU: (False, False, False), the dense-mask call SDPA's CPU kernels take. On CUDA: repeat when GQA
    meets fp32 or a mask (no fused backend takes those together), use the bias for bottom-right causal
    blocks, and forbid the math backend above ``MATH_MAX_PAIRS``."""
    if device_type != "cuda":
        return False, False, False
    repeat = gqa and (dtype == torch.float32 or rectangular_causal)
    return repeat, rectangular_causal, pairs > MATH_MAX_PAIRS


def _sdpa_group(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: BlockGroup, causal: bool,
                scale: float, dropout_p: float) -> torch.Tensor:
    q = query[group.q_rows].transpose(1, 2)  # [n, Hq, q_len, D]
    k = key[group.k_rows].transpose(1, 2)
    v = value[group.k_rows].transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    rectangular = causal and group.rectangular_causal
    repeat, lower_right, no_math = sdpa_call_plan(q.device.type, q.dtype, gqa, rectangular,
                                                  group.q_len * group.k_len)
    if repeat:
        groups_per_kv = q.shape[1] // k.shape[1]  # query head h reads K/V head h // groups_per_kv, as GQA does
        k, v = k.repeat_interleave(groups_per_kv, dim=1), v.repeat_interleave(groups_per_kv, dim=1)
        gqa = False
    mask, is_causal = None, causal and not rectangular
    if rectangular:
        mask = causal_lower_right(group.q_len, group.k_len) if lower_right else group.mask
    if not no_math:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=gqa)
    try:
        with sdpa_kernel(FUSED_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=gqa)
    except RuntimeError as err:
        raise RuntimeError(
            f"no fused SDPA kernel takes this attention block ({group.q_len} queries x {group.k_len} keys, "
            f"{q.dtype}, {q.shape[1]} heads of {q.shape[-1]}), and the math fallback would hold "
            f"[heads, {group.q_len}, {group.k_len}] probabilities: train in bf16 (train.precision) so the varlen "
            f"kernel runs, or shorten the rows") from err


def sdpa_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: AttentionPlan, *,
                scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Packed attention through SDPA, one call per distinct block shape."""
    outputs = [_sdpa_group(query, key, value, g, plan.causal, scale, dropout_p) for g in plan.groups]
    result = query.new_zeros(plan.num_query_rows, query.shape[1], value.shape[-1])
    if not outputs:
        return result
    # [n, Hq, q_len, D] -> [n*q_len, Hq, D], rows in plan.query_index order
    flat = [out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[-1]) for out in outputs]
    return result.index_copy(0, plan.query_index, torch.cat(flat))


def varlen_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: AttentionPlan, *,
                  scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Packed attention through the flash varlen kernel (CUDA, fp16/bf16, no dropout).

    Every block is one varlen "sequence": its queries and its key range are gathered contiguously with the
    plan's indices (a causal context-parallel chunk re-reads its segment's prefix; the flash kernel's
    bottom-right causal alignment then masks exactly as the plan intends)."""
    from torch.nn.attention.varlen import varlen_attn  # lazy: torch < 2.9 lacks it (resolve_kernel probes it first)

    if dropout_p:
        raise ValueError("the varlen kernel has no attention dropout: set attention_dropout=0 or use kernel='sdpa'")
    result = query.new_zeros(plan.num_query_rows, query.shape[1], value.shape[-1])
    if not plan.groups:
        return result
    extra = {}
    if query.shape[1] != key.shape[1] and varlen_signature_support().gqa_keyword:
        extra["enable_gqa"] = True  # torch >= 2.12 checks head counts unless told; older flash takes GQA as is
    out = varlen_attn(query[plan.query_index], key[plan.key_index], value[plan.key_index], plan.cu_seqlens_q,
                      plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k, scale=scale,
                      window_size=(-1, 0) if plan.causal else (-1, -1), **extra)
    return result.index_copy(0, plan.query_index, out)


KERNELS = {"sdpa": sdpa_packed, "varlen": varlen_packed}


def check_kernel_name(name: str) -> None:
    """Refuse an unknown kernel name (at build time, not in the first forward)."""
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}: choose one of auto, {', '.join(KERNELS)}")


def resolve_kernel(name: str, dtype: torch.dtype, dropout_p: float = 0.0,
                   device: torch.device | None = None) -> str:
    """The kernel that runs for ``name`` ('auto', 'sdpa' or 'varlen') on tensors of ``dtype`` on ``device``
    (default: the current CUDA device if one is visible).

    ``auto``: varlen where it can run (CUDA, half precision, no dropout, the probe passes), else sdpa."""
    check_kernel_name(name)
    if name == "auto":
        if dtype in HALF and not dropout_p and (device is None or device.type == "cuda"):
            return "varlen" if varlen_support(device).usable else "sdpa"
        return "sdpa"
    if name == "varlen":
        support = varlen_support(device)
        if not support.usable:
            raise ValueError(f"kernel='varlen' cannot run here: {support.reason}. Use kernel='auto' (it falls back "
                             "to sdpa) or 'sdpa'")
        if dtype not in HALF:
            raise ValueError(f"kernel='varlen' (flash) needs fp16 or bf16 tensors, not {dtype}: use kernel='auto'")
    return name
