"""The Hugging Face Qwen3-VL <-> our megatron model weight table, and the re-arrangements it uses.

Our names are those of ``Qwen3VLModel`` built unsharded (TP = PP = EP = 1): the *full* state dict. Cutting
it for a parallel layout is dist checkpointing's job (or ``state_dict_sharding``'s in tests). HF tensors
are in the canonical transformers 5.x layout (``hf_checkpoint`` reads the release expert layout too).

Re-arrangements, each written once with both directions:
  * LLM attention: HF q/k/v -> megatron ``linear_qkv`` grouped per KV head g: [q heads of g | k_g | v_g].
  * ViT attention: HF fused ``qkv`` rows [q | k | v] (head-major) -> the same per-head grouping.
  * SwiGLU: megatron ``linear_fc1`` = cat(gate, up) on dim 0.
  * MoE experts: HF fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` -> one MLP per expert.
  * Conv3d patch embedding [D, 3, 2, 16, 16] <-> Linear [D, 1536].
  * Tied embeddings (2B/4B): HF has no ``lm_head.weight`` and our model no ``output_layer.weight``.
"""
from __future__ import annotations

import torch

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.interop.weight_table import Mapping, Transform, Weight, expand, to_ours, to_theirs

HF_LLM = "model.language_model."
HF_VIT = "model.visual."


# --- transforms ------------------------------------------------------------------------------------
def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows (or bias entries) of q [nh·hd], k, v [nkv·hd] -> megatron's per-group [q_g | k_g | v_g]."""
    tail = q.shape[1:]
    q, k, v = (x.reshape(groups, -1, *tail) for x in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def ungroup_qkv(qkv: torch.Tensor, groups: int, q_rows: int, kv_rows: int) -> list[torch.Tensor]:
    """Inverse of ``group_qkv`` (row counts per group: q_rows, kv_rows)."""
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, q_rows + 2 * kv_rows, *tail).split([q_rows, kv_rows, kv_rows], dim=1)
    return [x.reshape(-1, *tail) for x in (q, k, v)]


class TextQKV(Transform):
    """HF (q_proj, k_proj, v_proj) <-> our grouped ``linear_qkv`` (GQA: one group per KV head)."""

    def to_ours(self, theirs, config):
        return [group_qkv(*theirs, config.text.num_key_value_heads)]

    def to_theirs(self, ours, config):
        t = config.text
        ratio = t.num_attention_heads // t.num_key_value_heads
        return ungroup_qkv(ours[0], t.num_key_value_heads, ratio * t.head_dim, t.head_dim)


class VisionQKV(Transform):
    """HF fused ``qkv`` [q | k | v] <-> our grouped ``linear_qkv`` (MHA: one group per head)."""

    def to_ours(self, theirs, config):
        return [group_qkv(*theirs[0].chunk(3, dim=0), config.vision.num_heads)]

    def to_theirs(self, ours, config):
        v = config.vision
        return [torch.cat(ungroup_qkv(ours[0], v.num_heads, v.head_dim, v.head_dim), dim=0)]


class GateUp(Transform):
    """HF (gate_proj, up_proj) <-> our SwiGLU ``linear_fc1`` = cat(gate, up)."""

    def to_ours(self, theirs, config):
        return [torch.cat(list(theirs), dim=0)]

    def to_theirs(self, ours, config):
        return list(ours[0].chunk(2, dim=0))


class Experts(Transform):
    """HF one fused [E, ...] tensor <-> our E per-expert tensors."""

    def to_ours(self, theirs, config):
        return list(theirs[0].unbind(0))

    def to_theirs(self, ours, config):
        return [torch.stack(list(ours))]


class PatchConv(Transform):
    """HF Conv3d weight [D, C, T, P, P] <-> our Linear over the flattened (C, T, P, P) patch [D, C·T·P·P]."""

    def to_ours(self, theirs, config):
        return [theirs[0].reshape(config.vision.hidden_size, -1)]

    def to_theirs(self, ours, config):
        v = config.vision
        return [ours[0].reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)]


# --- the table -------------------------------------------------------------------------------------
def untied(config: Qwen3VLConfig) -> bool:
    return not config.tie_word_embeddings


def _merger(ours: str, theirs: str) -> list[Weight]:
    return [Weight(f"{ours}.{part}.{kind}", f"{theirs}.{part}.{kind}")
            for part in ("norm", "linear_fc1", "linear_fc2") for kind in ("weight", "bias")]


_VIT = f"{HF_VIT}blocks.{{n}}."
_EXPERT = "decoder.layers.{i}.mlp.experts.local_experts.{e}."


def llm_weights(prefix: str, experts: str = "fused") -> tuple[Weight, ...]:
    """The Qwen3 decoder's weights under ``prefix`` (``model.language_model.`` in Qwen3-VL, ``model.`` in a
    Qwen3 causal LM). ``experts``: "fused" (``mlp.experts.gate_up_proj`` [E, 2I, H], transformers 5.x in
    memory) or "per_expert" (``mlp.experts.{e}.gate_proj.weight`` ..., the Qwen3-MoE files)."""
    layer = f"{prefix}layers.{{i}}."
    if experts == "fused":
        moe = (Weight(_EXPERT + "linear_fc1.weight", layer + "mlp.experts.gate_up_proj", Experts(), layers="moe"),
               Weight(_EXPERT + "linear_fc2.weight", layer + "mlp.experts.down_proj", Experts(), layers="moe"))
    else:
        expert = layer + "mlp.experts.{e}."
        moe = (Weight(_EXPERT + "linear_fc1.weight", (expert + "gate_proj.weight", expert + "up_proj.weight"),
                      GateUp(), layers="moe"),
               Weight(_EXPERT + "linear_fc2.weight", expert + "down_proj.weight", layers="moe"))
    return (
        Weight("embedding.word_embeddings.weight", prefix + "embed_tokens.weight"),
        Weight("decoder.layers.{i}.input_layernorm.weight", layer + "input_layernorm.weight"),
        Weight("decoder.layers.{i}.self_attention.linear_qkv.weight",
               tuple(f"{layer}self_attn.{x}_proj.weight" for x in "qkv"), TextQKV()),
        Weight("decoder.layers.{i}.self_attention.linear_proj.weight", layer + "self_attn.o_proj.weight"),
        Weight("decoder.layers.{i}.self_attention.q_layernorm.weight", layer + "self_attn.q_norm.weight"),
        Weight("decoder.layers.{i}.self_attention.k_layernorm.weight", layer + "self_attn.k_norm.weight"),
        Weight("decoder.layers.{i}.pre_mlp_layernorm.weight", layer + "post_attention_layernorm.weight"),
        Weight("decoder.layers.{i}.mlp.linear_fc1.weight",
               (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"), GateUp(), layers="dense"),
        Weight("decoder.layers.{i}.mlp.linear_fc2.weight", layer + "mlp.down_proj.weight", layers="dense"),
        Weight("decoder.layers.{i}.mlp.router.weight", layer + "mlp.gate.weight", layers="moe"),
        *moe,
        Weight("decoder.final_layernorm.weight", prefix + "norm.weight"),
        Weight("output_layer.weight", "lm_head.weight", when=untied),
    )


VISION_WEIGHTS: tuple[Weight, ...] = (
    Weight("vision.patch_embed.proj.weight", HF_VIT + "patch_embed.proj.weight", PatchConv()),
    Weight("vision.patch_embed.proj.bias", HF_VIT + "patch_embed.proj.bias"),
    Weight("vision.pos_embed.weight", HF_VIT + "pos_embed.weight"),
    *(Weight(f"vision.layers.{{n}}.{ours}.{kind}", f"{_VIT}{theirs}.{kind}")
      for ours, theirs in (("input_layernorm", "norm1"), ("pre_mlp_layernorm", "norm2"),
                           ("self_attention.linear_proj", "attn.proj"), ("mlp.linear_fc1", "mlp.linear_fc1"),
                           ("mlp.linear_fc2", "mlp.linear_fc2"))
      for kind in ("weight", "bias")),
    *(Weight(f"vision.layers.{{n}}.self_attention.linear_qkv.{kind}", f"{_VIT}attn.qkv.{kind}", VisionQKV())
      for kind in ("weight", "bias")),
    *_merger("vision.merger", HF_VIT + "merger"),
    *_merger("vision.deepstack_merger_list.{j}", HF_VIT + "deepstack_merger_list.{j}"),
)

QWEN3VL_WEIGHTS: tuple[Weight, ...] = VISION_WEIGHTS + llm_weights(HF_LLM)


def qwen3vl_mappings(config: Qwen3VLConfig) -> list[Mapping]:
    """Every Qwen3-VL weight of ``config``: our names, HF names, the transform between them."""
    return expand(QWEN3VL_WEIGHTS, config)


def hf_to_mcore_state_dict(hf_sd: dict[str, torch.Tensor], config: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    """HF names/layout (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``) -> our full model."""
    return to_ours(qwen3vl_mappings(config), hf_sd, config)


def mcore_to_hf_state_dict(sd: dict[str, torch.Tensor], config: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    """Our full model's state dict -> HF names in the transformers 5.x layout (no lm_head when tied)."""
    return to_theirs(qwen3vl_mappings(config), sd, config)

