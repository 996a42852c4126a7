"""Layer specs of the Qwen3 language model on megatron-core.

Every layer: pre-norm RMSNorm, self-attention with a fused QKV column-parallel projection (GQA, no bias),
per-head RMSNorm on q and k (QK-norm) before RoPE, row-parallel output projection; then RMSNorm and either
a SwiGLU MLP (no bias) or megatron's ``MoELayer`` (router softmax -> top-k -> renormalise, no shared expert,
aux loss through megatron's auto-scaler; experts spread over the expert-parallel group). Layers are
``DeepStackTransformerLayer`` so the first three can take DeepStack features.
"""
from __future__ import annotations

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules, get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules, get_transformer_layer_offset
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from qwen3vl.model.attention import core_attention_class
from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.deepstack import DeepStackTransformerLayer
from qwen3vl.model.norms import RMSNorm
from qwen3vl.model.rotary_attention import RotarySelfAttention


def qwen3_layer_spec(moe: bool, attention_backend: str = "auto") -> ModuleSpec:
    """One decoder layer; ``moe`` picks megatron's MoELayer (SequentialMLP experts) over a dense SwiGLU MLP."""
    mlp = get_mlp_module_spec_for_backend(LocalSpecProvider(), num_experts=1 if moe else None,
                                          moe_grouped_gemm=False)
    return ModuleSpec(
        module=DeepStackTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=RotarySelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=core_attention_class(attention_backend),
                    linear_proj=RowParallelLinear, q_layernorm=RMSNorm, k_layernorm=RMSNorm)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def qwen3_block_spec(config: Qwen3VLConfig, transformer_config: TransformerConfig,
                     vp_stage: int | None = None, attention_backend: str = "auto") -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds (dense or MoE per layer, transformers' rule) + the final RMSNorm."""
    offset = get_transformer_layer_offset(transformer_config, vp_stage=vp_stage)
    count = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    specs = [qwen3_layer_spec(config.text.is_moe_layer(offset + i), attention_backend) for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)
