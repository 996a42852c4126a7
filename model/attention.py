"""Core attention for packed rows and context parallelism, plugged into megatron's layer spec.

megatron-core's local ``DotProductAttention`` rejects packed sequences (THD) and context parallelism, so
``PackedCoreAttention`` replaces it as the ``core_attention`` submodule of ``SelfAttention``:

  * THD input (``packed_seq_params.qkv_format == 'thd'``): query/key/value arrive as [T, heads, head_dim];
    attention stays inside each segment, causal for ``AttnMaskType.causal``/``padding_causal`` (the LLM) and
    bidirectional for ``no_mask``/``padding`` (ViT frame groups); padding keys are never read and padding
    queries output zeros. Returns [T, heads·head_dim].
  * Context parallelism (``config.context_parallel_size > 1``): the local rows are this rank's zig-zag rows
    (``qwen3vl.parallel.context_parallel.zigzag_index``); K/V are all-gathered over the CP group (autograd:
    all-reduce then slice) and masked by global position. The vision encoder's config must keep
    ``context_parallel_size=1``: frame groups are split across CP ranks whole, never by rows.
  * Anything else (SBHD, [s, b, heads, hd]) is plain SDPA with megatron's mask convention (True = masked).

Kernels (the ``kernel`` argument, default ``auto``): ``sdpa`` batches same-shape segments into one
``scaled_dot_product_attention`` call (exact, CPU and GPU); ``varlen`` is torch's flash varlen kernel (CUDA,
half precision, no dropout); ``auto`` takes varlen where it can. ``core_attention_class(backend)`` gives the
layer spec its entry: transformer-engine's ``TEDotProductAttention`` when transformer_engine imports (it does
THD and CP itself), else this module, optionally pinned to one kernel.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen3vl.model.attention_kernels import KERNELS, AttentionPlan, build_plan, resolve_kernel
from qwen3vl.parallel.context_parallel import all_gather_key_value, gathered_key_order

CAUSAL_MASKS = (AttnMaskType.causal, AttnMaskType.padding_causal)
BIDIRECTIONAL_MASKS = (AttnMaskType.no_mask, AttnMaskType.padding)
_PLAN_CACHE = "_qwen3vl_attention_plans"


def build_packed_seq_params(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor | None = None,
                            max_seqlen: int | None = None) -> PackedSeqParams:
    """megatron ``PackedSeqParams`` for one packed row (int32 cumulative lengths; ``max_seqlen`` a Python int,
    by default the longest padded segment). Under context parallelism pass the *global* cu_seqlens."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    cu_seqlens_padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded.to(torch.int32)
    if max_seqlen is None:
        lengths = cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a CUDA-less import failure
        return False
    return True


ATTENTION_BACKENDS = ("auto", "te", "local", "sdpa", "varlen")


def core_attention_class(backend: str = "auto") -> Callable[..., MegatronModule]:
    """What to put in a layer spec's ``core_attention`` (megatron calls it with the constructor kwargs).

    ``te``: transformer-engine's ``TEDotProductAttention``; ``auto``: that when transformer_engine imports,
    else ``PackedCoreAttention`` choosing its kernel itself; ``local``: ``PackedCoreAttention`` (kernel auto);
    ``sdpa`` / ``varlen``: ``PackedCoreAttention`` pinned to that kernel."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "te" or (backend == "auto" and transformer_engine_available()):
        if not transformer_engine_available():
            raise ValueError("attention backend 'te' needs transformer_engine installed: use 'auto' or 'local'")
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
        return TEDotProductAttention
    if backend in KERNELS:
        resolve_kernel(backend, torch.bfloat16)  # fail when the spec is built, not in the first forward
        return functools.partial(PackedCoreAttention, kernel=backend)
    return PackedCoreAttention


class PackedCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` (same constructor as megatron's ``DotProductAttention``) for packed rows
    and context parallelism; ``kernel`` is 'auto', 'sdpa' or 'varlen' (see ``core_attention_class``)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, kernel: str = "auto", **kwargs):
        super().__init__(config=config)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"PackedCoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("PackedCoreAttention has no sliding-window attention: unset config.window_size")
        if cp_comm_type not in (None, "all_gather", "p2p"):
            # p2p is transformer-engine's default name; this module always all-gathers K/V (exact, and cheap
            # under GQA), so both names mean the same here. a2a would need a different algorithm.
            raise ValueError(f"cp_comm_type {cp_comm_type!r} is not supported by PackedCoreAttention: "
                             "use 'all_gather' (or 'p2p', served by all-gather)")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.kernel = kernel
        resolve_kernel(kernel, torch.float32)  # fail at build time on an unknown name
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_size = config.context_parallel_size
        self._pg_collection = pg_collection

    # --- context parallelism ----------------------------------------------------------------------
    def _cp_group(self):
        group = getattr(self._pg_collection, "cp", None) if self._pg_collection is not None else None
        group = group if group is not None else parallel_state.get_context_parallel_group()
        if group.size() != self.cp_size:
            raise ValueError(f"config.context_parallel_size={self.cp_size} but the CP group has {group.size()} "
                             "ranks: build the model after initialize_parallel with the same CP size")
        return group

    def _plan(self, params: PackedSeqParams, causal: bool, device: torch.device) -> AttentionPlan:
        """Blocks for this row, cached on the PackedSeqParams object: every layer of one forward shares it."""
        cache = getattr(params, _PLAN_CACHE, None)
        if cache is None:
            cache = {}
            setattr(params, _PLAN_CACHE, cache)
        cp_rank = self._cp_group().rank() if self.cp_size > 1 else 0
        key = (causal, self.cp_size, cp_rank, device)
        if key not in cache:
            cu = params.cu_seqlens_q
            cu_padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else cu
            key_order = gathered_key_order(cu_padded, self.cp_size) if self.cp_size > 1 else None
            plan = build_plan(cu.tolist(), cu_padded.tolist(), causal=causal, cp_size=self.cp_size,
                              cp_rank=cp_rank, key_order=key_order)
            cache[key] = plan.to(device)
        return cache[key]

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention does not take an attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type not in CAUSAL_MASKS + BIDIRECTIONAL_MASKS and not (
                mask_type == AttnMaskType.arbitrary and packed_seq_params is None):
            raise ValueError(f"attn_mask_type {mask_type} is not supported: use causal, padding_causal, "
                             "no_mask or padding (arbitrary only with an explicit mask and no packing)")
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return self._forward_sbhd(query, key, value, attention_mask, mask_type, dropout_p)

        causal = mask_type in CAUSAL_MASKS
        if query.dim() == 4:  # [T, 1, heads, hd] when called outside megatron's THD squeeze
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if self.cp_size > 1:
            key, value = all_gather_key_value(key, value, self._cp_group())
        plan = self._plan(packed_seq_params, causal, query.device)
        if plan.num_query_rows != query.shape[0]:
            raise ValueError(f"packed_seq_params describe {plan.num_query_rows} local rows but query has "
                             f"{query.shape[0]}: pass the global cu_seqlens and this rank's zig-zag rows")
        kernel = KERNELS[resolve_kernel(self.kernel, query.dtype, dropout_p)]
        out = kernel(query, key, value, plan, scale=self.softmax_scale, dropout_p=dropout_p)
        return out.reshape(out.shape[0], -1)

    def _forward_sbhd(self, query, key, value, attention_mask, mask_type, dropout_p) -> torch.Tensor:
        """[s, b, heads, hd] -> [s, b, heads·hd]; megatron masks are True where attention is forbidden."""
        if self.cp_size > 1:
            raise ValueError("context parallelism needs packed (THD) inputs: pass packed_seq_params")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hd]
        mask = None if attention_mask is None else ~attention_mask.bool()
        is_causal = mask is None and mask_type in CAUSAL_MASKS
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        out = out.permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)
