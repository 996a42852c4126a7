"""What a Qwen3-VL model is: the vision tower, the text decoder (dense or MoE) and the glue ids.

These dataclasses hold architecture numbers only (no parallelism, no precision); see
``qwen3vl.model.presets`` for the released sizes and ``qwen3vl.model.interop.hf_config`` for config.json.
``validate()`` raises ``ModelConfigError`` with a message that says which number to change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


class ModelConfigError(ValueError):
    """An architecture config that cannot describe a working Qwen3-VL model."""


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096  # = the text hidden size
    num_position_embeddings: int = 2304  # a square grid of learned absolute positions (48 x 48)
    # ViT blocks (0-based, output after the block) feeding the three DeepStack mergers.
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened Conv3d patch (C, T, Ph, Pw): 1536 for the released models."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merged_hidden_size(self) -> int:
        """Width of one 2x2 block of patches after the shuffle: 4·D."""
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(f"vision hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ModelConfigError(f"vision head dim {self.head_dim} must be divisible by 4 (2-D RoPE uses head_dim/4 "
                              "frequencies per axis); change vision hidden_size or num_heads")
        if self.position_grid_side**2 != self.num_position_embeddings:
            raise ModelConfigError(f"vision num_position_embeddings {self.num_position_embeddings} must be a perfect "
                              "square (it is read as a square grid)")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ModelConfigError(f"deepstack_visual_indexes {bad} are outside the {self.depth} vision blocks")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ModelConfigError(f"vision hidden_act {self.hidden_act!r} is not supported; Qwen3-VL uses gelu_pytorch_tanh")


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    # Interleaved MRoPE: numbers of rotary frequencies driven by the (t, h, w) position rows.
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    # --- mixture of experts (num_experts == 0: dense model) ---
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) has a sparse MoE MLP, by transformers' rule."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs of channels)")
        # Interleaved MRoPE (model/mrope.py, as transformers): frequency i follows h when i % 3 == 1 and
        # i < 3·section_h, w when i % 3 == 2 and i < 3·section_w, else t. That is defined for every pair of
        # counts (sections past head_dim/2 are cut off, the t count is what is left), so only entries that
        # are not counts are refused.
        section = tuple(self.mrope_section)
        if len(section) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                        for n in section):
            raise ModelConfigError(f"mrope_section {list(section)} must be three counts >= 0 (t, h, w frequencies), "
                              "e.g. [24, 20, 20]")
        if self.hidden_act != "silu":
            raise ModelConfigError(f"text hidden_act {self.hidden_act!r} is not supported; Qwen3 uses silu (SwiGLU)")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ModelConfigError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts "
                                  f"({self.num_experts})")
            if self.moe_intermediate_size <= 0:
                raise ModelConfigError("an MoE model needs moe_intermediate_size > 0")
            if self.decoder_sparse_step < 1:
                raise ModelConfigError("decoder_sparse_step must be >= 1")


@dataclass
class Qwen3VLConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @property
    def is_moe(self) -> bool:
        return self.text.is_moe

    @property
    def num_deepstack_layers(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    def layout_dims(self) -> dict:
        """The sizes the parallel layout rules depend on, as ``ParallelLayout.problems`` keywords."""
        t = self.text
        return dict(num_attention_heads=t.num_attention_heads, num_query_groups=t.num_key_value_heads,
                    num_layers=t.num_layers, num_experts=t.num_experts or None,
                    deepstack_layers=self.num_deepstack_layers, vision_heads=self.vision.num_heads)

    def validate(self) -> "Qwen3VLConfig":
        self.vision.validate()
        self.text.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ModelConfigError(f"vision out_hidden_size {self.vision.out_hidden_size} must equal the text "
                              f"hidden_size {self.text.hidden_size}")
        if self.num_deepstack_layers > self.text.num_layers:
            raise ModelConfigError(f"{self.num_deepstack_layers} DeepStack features need at least as many text layers "
                              f"(have {self.text.num_layers})")
        special = {"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                   "vision_start_token_id": self.vision_start_token_id,
                   "vision_end_token_id": self.vision_end_token_id}
        too_big = {k: v for k, v in special.items() if not 0 <= v < self.text.vocab_size}
        if too_big:
            raise ModelConfigError(f"special token ids {too_big} do not fit vocab_size {self.text.vocab_size}")
        return self
