"""The Qwen3-VL vision tower on megatron-core, with its mergers.

pixel_values [N, 1536] -> Conv3d patch embedding -> + resampled learned absolute positions -> ViT blocks
(pre-norm LayerNorm, bias, tanh-GELU MLP, 2-D RoPE, bidirectional attention within each frame group only,
given to the core attention as a packed THD row whose segments are the frame groups) -> the final 2x2 merger,
plus the DeepStack mergers reading the outputs of blocks ``deepstack_visual_indexes``.
Returns the merged features of every visual token in pixel_values order and the DeepStack features.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, checkpoint
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.dist_checkpointing.mapping import ShardedStateDict

from qwen3vl.model.attention import core_attention_class
from qwen3vl.model.config import VisionConfig
from qwen3vl.model.merger import PatchMerger
from qwen3vl.model.norms import LayerNorm
from qwen3vl.model.rotary_attention import RotarySelfAttention
from qwen3vl.model.vision_grid import frame_group_cu_seqlens
from qwen3vl.model.vision_patch_embed import PatchEmbed
from qwen3vl.model.vision_pos_embed import VisionPositionEmbedding
from qwen3vl.model.vision_rope import VisionRotaryEmbedding
from qwen3vl.parallel.micro_batch import build_packed_seq_params


def vision_layer_spec(attention_backend: str = "auto") -> ModuleSpec:
    """One ViT block: bidirectional attention (no_mask within each packed frame group), fp32 RoPE."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=RotarySelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask, "rotary_in_fp32": True},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=core_attention_class(attention_backend),
                    linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class VisionEncoder(MegatronModule):
    def __init__(self, vision: VisionConfig, transformer_config: TransformerConfig,
                 attention_backend: str = "auto") -> None:
        super().__init__(config=transformer_config)
        dtype = transformer_config.params_dtype
        merge = vision.spatial_merge_size
        self.deepstack_visual_indexes = tuple(vision.deepstack_visual_indexes)
        self.patch_embed = PatchEmbed(vision.patch_dim, vision.hidden_size, dtype)
        self.pos_embed = VisionPositionEmbedding(vision.num_position_embeddings, vision.hidden_size, merge, dtype)
        self.rotary = VisionRotaryEmbedding(vision.head_dim, vision.rope_theta, merge)
        spec = vision_layer_spec(attention_backend)
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=transformer_config, layer_number=i + 1) for i in range(vision.depth))
        self.merger = PatchMerger(transformer_config, vision.hidden_size, vision.out_hidden_size, merge,
                                  postshuffle_norm=False, eps=vision.layer_norm_eps)
        self.deepstack_merger_list = torch.nn.ModuleList(
            PatchMerger(transformer_config, vision.hidden_size, vision.out_hidden_size, merge,
                        postshuffle_norm=True, eps=vision.layer_norm_eps)
            for _ in self.deepstack_visual_indexes)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """Like megatron's TransformerBlock: every ViT block and DeepStack merger gives its own sharded
        state dict (``layers.<i>.``, ``deepstack_merger_list.<j>.``), so their tensor-parallel weights are
        saved as TP shards. megatron's default would read these plain ModuleLists as replicated tensors of
        their local shape. The other children (patch embedding, positions, final merger) keep the default:
        their own ``sharded_state_dict`` where they have one, else replicated over TP.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        # Named explicitly: given only the dp_cp group, megatron's helpers give every TP rank replica id 0.
        tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
        sharded = {}
        for name, child in self.named_children():
            if isinstance(child, torch.nn.ModuleList):
                for index, item in enumerate(child):
                    sharded.update(item.sharded_state_dict(f"{prefix}{name}.{index}.", sharded_offsets, metadata))
            else:
                sharded.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                          tp_group=tp_group))
        return sharded

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [N, patch_dim], grid_thw [M, 3] -> (features [N/4, H], DeepStack features J x [N/4, H])."""
        hidden = self.patch_embed(pixel_values) + self.pos_embed(grid_thw)
        hidden = hidden.unsqueeze(1)  # [N, 1, D]: megatron's [s, b, h]
        cos_sin = self.rotary(grid_thw)
        cu = frame_group_cu_seqlens(grid_thw).to(hidden.device)
        packed = build_packed_seq_params(cu, cu)
        deepstack = []
        # Full activation recompute (the LLM config's setting): keep only each block's input, redo it in backward.
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            def run(h: torch.Tensor, layer=layer) -> torch.Tensor:
                return layer(h, attention_mask=None, rotary_pos_emb=cos_sin, packed_seq_params=packed)[0]

            hidden = checkpoint(run, False, hidden) if recompute else run(hidden)
            if index in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(hidden.squeeze(1)))
        return self.merger(hidden.squeeze(1)), deepstack
