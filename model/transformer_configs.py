"""megatron ``TransformerConfig`` objects for the two transformers of Qwen3-VL (LLM and ViT).

Parallel degrees are read from megatron's ``parallel_state``, so build these after
``qwen3vl.parallel.groups.initialize_parallel`` (there is one source of truth for the layout). Where the
weights are created follows the device the caller builds on (``on_gpu``), never whether a GPU is visible. The ViT
is never pipelined nor context-split (it runs whole on the first pipeline stage; under CP its frame groups
are spread across ranks by ``encode_vision_across_cp``), so its config says pp = cp = 1 and no sequence
parallelism; it shares the LLM's tensor parallelism.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from qwen3vl.model.config import ModelConfigError, Qwen3VLConfig
from qwen3vl.parallel.layout import LayoutError, ParallelLayout


def _precision(dtype: torch.dtype) -> dict[str, Any]:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelConfigError(f"dtype {dtype} is not supported: use torch.float32, torch.bfloat16 or torch.float16")
    return dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


def _common(on_gpu: bool) -> dict[str, Any]:
    return dict(
        hidden_dropout=0.0, attention_dropout=0.0,
        # A model built for the CPU creates its weights there; on a GPU megatron initialises them in place.
        use_cpu_initialization=not on_gpu,
        # We apply RoPE ourselves (rotary_attention.py); TE's fused RoPE cannot do MRoPE anyway.
        apply_rope_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def _pipeline_split(num_layers: int, pp: int, vpp: Optional[int], deepstack: int,
                    pipeline_layers: Optional[Sequence[int]]) -> dict[str, Any]:
    """megatron's pipeline layout for an explicit split, after the layout's pipeline rules
    (``ParallelLayout.pipeline_problems``: one count per (virtual) stage, 0 allowed, DeepStack's layers
    on the first stage).

    ``pipeline_layers``: LLM layers per pipeline stage, or per virtual stage in model order with vpp
    (stage 0 chunk 0, stage 1 chunk 0, ..., stage 0 chunk 1, ...).
    """
    layout = ParallelLayout(pp=pp, vpp=vpp, pipeline_layers=pipeline_layers)
    if layout.num_stages == 1:
        return {}
    problems = layout.pipeline_problems(num_layers, deepstack)
    if problems:
        raise LayoutError(problems)
    if pipeline_layers is None:
        return {}
    stages = [["decoder"] * n for n in layout.stage_layers(num_layers)]
    stages[0].insert(0, "embedding")
    stages[-1].append("loss")
    return dict(pipeline_model_parallel_layout=stages)


def text_transformer_config(config: Qwen3VLConfig, dtype: torch.dtype = torch.float32,
                            pipeline_layers: Optional[Sequence[int]] = None, on_gpu: bool = False,
                            **overrides: Any) -> TransformerConfig:
    """The LLM's config (dense or MoE) for the current parallel state, for a model built on the GPU
    (``on_gpu``) or the CPU. ``overrides`` go to TransformerConfig last (e.g. recompute_granularity,
    calculate_per_token_loss, moe_token_dispatcher_type)."""
    t = config.text
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    kwargs: dict[str, Any] = dict(
        num_layers=t.num_layers, hidden_size=t.hidden_size, ffn_hidden_size=t.intermediate_size,
        num_attention_heads=t.num_attention_heads, num_query_groups=t.num_key_value_heads, kv_channels=t.head_dim,
        add_bias_linear=False, add_qkv_bias=False, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", layernorm_epsilon=t.rms_norm_eps, qk_layernorm=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=False,
        **_pipeline_split(t.num_layers, pp, vpp, config.num_deepstack_layers, pipeline_layers),
        **_precision(dtype), **_common(on_gpu))
    if t.is_moe:
        kwargs.update(
            num_moe_experts=t.num_experts, moe_router_topk=t.num_experts_per_tok,
            moe_ffn_hidden_size=t.moe_intermediate_size,
            moe_layer_freq=[1 if t.is_moe_layer(i) else 0 for i in range(t.num_layers)],
            # softmax over the top-k logits == softmax over all experts, top-k, renormalised (transformers).
            moe_router_pre_softmax=False, moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=t.router_aux_loss_coef,
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_permute_fusion=False,
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def vision_transformer_config(config: Qwen3VLConfig, dtype: torch.dtype = torch.float32, on_gpu: bool = False,
                              **overrides: Any) -> TransformerConfig:
    """The ViT's config: pre-norm LayerNorm blocks with biases and tanh-GELU, MHA, never pipelined or CP-split.
    ``recompute_granularity="full"`` recomputes each ViT block in backward (see ``VisionEncoder``)."""
    v = config.vision
    kwargs: dict[str, Any] = dict(
        num_layers=v.depth, hidden_size=v.hidden_size, ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads, num_query_groups=v.num_heads, kv_channels=v.head_dim,
        add_bias_linear=True, add_qkv_bias=True, gated_linear_unit=False,
        activation_func=functools.partial(F.gelu, approximate="tanh"),
        normalization="LayerNorm", layernorm_epsilon=v.layer_norm_eps, qk_layernorm=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=1, context_parallel_size=1, sequence_parallel=False,
        **_precision(dtype), **_common(on_gpu))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
