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

Kernels (the ``kernel`` argument, default ``auto``; ``attention_kernels.py``): ``sdpa`` batches same-shape
segments into one ``scaled_dot_product_attention`` call (exact, CPU and GPU); ``varlen`` is torch's flash
varlen kernel (CUDA, half precision, no dropout); ``auto`` takes varlen where the probe says it runs.
``core_attention_class(backend)`` gives the layer spec its entry. transformer-engine's
``TEDotProductAttention`` (it does THD and CP itself) is used only when asked for (``te``): installing
transformer-engine must not change the kernel of a run, and no TE-vs-ours parity test has passed on a GPU
yet (tests/model/test_attention_gpu.py has it; TE's THD+CP path has known wrong-attention bugs with tail
padding, TransformerEngine#3331).
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

from qwen3vl.model.attention_kernels import KERNELS, check_kernel_name, resolve_kernel
from qwen3vl.model.attention_plan import AttentionPlan, plan_for
from qwen3vl.model.attention_support import transformer_engine_support, varlen_support
from qwen3vl.parallel.context_parallel import all_gather_key_value
from qwen3vl.parallel.layout import ALL_GATHER_CP_COMM_TYPES

CAUSAL_MASKS = (AttnMaskType.causal, AttnMaskType.padding_causal)
BIDIRECTIONAL_MASKS = (AttnMaskType.no_mask, AttnMaskType.padding)


ATTENTION_BACKENDS = ("auto", "te", "local", "sdpa", "varlen")


def core_attention_class(backend: str = "auto") -> Callable[..., MegatronModule]:
    """What to put in a layer spec's ``core_attention`` (megatron calls it with the constructor kwargs).

    ``auto`` / ``local``: ``PackedCoreAttention`` choosing its kernel per call (flash varlen on a GPU in half
    precision, SDPA otherwise); ``sdpa`` / ``varlen``: ``PackedCoreAttention`` pinned to that kernel; ``te``:
    transformer-engine's ``TEDotProductAttention`` (opt-in, see the module docstring)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "te":
        support = transformer_engine_support()
        if not support.usable:
            raise ValueError(f"attention backend 'te' cannot be built: {support.reason}. Use 'auto'")
        from megatron.core.extensions.transformer_engine import TEDotProductAttention  # lazy: imports TE (optional)

        return TEDotProductAttention
    if backend == "varlen" and not varlen_support().usable:  # fail when the spec is built, not in a forward
        raise ValueError(f"attention backend 'varlen' cannot run here: {varlen_support().reason}. Use 'auto'")
    if backend in KERNELS:
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
        if cp_comm_type is not None and cp_comm_type not in ALL_GATHER_CP_COMM_TYPES:
            # p2p is transformer-engine's default name; this module always all-gathers K/V (exact, and cheap
            # under GQA), so both names mean the same here. a2a would need a different algorithm.
            raise ValueError(f"cp_comm_type {cp_comm_type!r} is not supported by PackedCoreAttention: "
                             "use 'all_gather' (or 'p2p', served by all-gather), or transformer-engine")
        self.cp_comm_type = cp_comm_type
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.kernel = kernel
        check_kernel_name(kernel)  # fail at build time on an unknown name
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
        """This micro-batch's plan, built by the first layer that sees it (``attention_plan.plan_for``)."""
        cp_rank = self._cp_group().rank() if self.cp_size > 1 else 0
        return plan_for(params, causal=causal, cp_size=self.cp_size, cp_rank=cp_rank, device=device)

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
        kernel = KERNELS[resolve_kernel(self.kernel, query.dtype, dropout_p, query.device)]
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
