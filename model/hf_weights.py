"""Hugging Face Qwen3-VL state dict <-> our megatron model's full (unsharded) state dict.

"Full" means the names and shapes of ``Qwen3VLModel`` built with TP = PP = EP = 1; cutting it for a
parallel layout is ``qwen3vl.model.state_dict_sharding``'s job. Both directions are pure tensor
re-arrangements (no arithmetic), so a round trip is bitwise exact.

Re-arrangements:
  * LLM attention: HF q/k/v -> megatron ``linear_qkv`` grouped per KV head g: [q heads of g | k_g | v_g].
  * ViT attention: HF fused ``qkv`` rows [q | k | v] (head-major) -> the same per-head grouping.
  * SwiGLU: megatron ``linear_fc1`` = cat(gate, up) on dim 0.
  * MoE experts: HF 5.x fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` (the release layout
    [E, H, 2I] / [E, I, H] is also read, told apart by shape) -> one SwiGLU MLP per expert.
  * Conv3d patch embedding [D, 3, 2, 16, 16] <-> Linear [D, 1536].
  * Tied embeddings (2B/4B): HF has no ``lm_head.weight`` and our model no ``output_layer.weight``.
"""
from __future__ import annotations

import torch

from qwen3vl.model.config import Qwen3VLConfig

HF_LLM = "model.language_model."
HF_VIT = "model.visual."

# name suffixes mapped 1:1 (ours, HF); per block / layer / merger
_VIT_BLOCK = {
    "input_layernorm.weight": "norm1.weight", "input_layernorm.bias": "norm1.bias",
    "pre_mlp_layernorm.weight": "norm2.weight", "pre_mlp_layernorm.bias": "norm2.bias",
    "self_attention.linear_proj.weight": "attn.proj.weight", "self_attention.linear_proj.bias": "attn.proj.bias",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight", "mlp.linear_fc1.bias": "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight", "mlp.linear_fc2.bias": "mlp.linear_fc2.bias",
}
_MERGER = {f"{part}.{kind}": f"{part}.{kind}" for part in ("norm", "linear_fc1", "linear_fc2")
           for kind in ("weight", "bias")}
_LLM_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


# --- attention layouts ------------------------------------------------------------------------------
def _qkv_to_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows (or bias entries) of q [nh·hd], k, v [nkv·hd] -> megatron's per-group [q_g | k_g | v_g]."""
    tail = q.shape[1:]
    q, k, v = (x.reshape(groups, -1, *tail) for x in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _grouped_to_qkv(qkv: torch.Tensor, groups: int, q_rows: int, kv_rows: int):
    """Inverse of ``_qkv_to_grouped`` (row counts per group: q_rows, kv_rows)."""
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, q_rows + 2 * kv_rows, *tail)
    q, k, v = grouped.split([q_rows, kv_rows, kv_rows], dim=1)
    return (x.reshape(-1, *tail).contiguous() for x in (q, k, v))


def _expert_tensors(hf_sd: dict, prefix: str, config: Qwen3VLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [E, 2I, H] and down [E, H, I] of one layer, whichever layout the checkpoint uses."""
    t = config.text
    gate_up, down = hf_sd[prefix + "gate_up_proj"], hf_sd[prefix + "down_proj"]
    five = (t.num_experts, 2 * t.moe_intermediate_size, t.hidden_size)
    if tuple(gate_up.shape) != five:
        if tuple(gate_up.shape) != (five[0], five[2], five[1]):
            raise ValueError(f"{prefix}gate_up_proj has shape {list(gate_up.shape)}; expected {list(five)} "
                             f"(transformers 5.x) or {[five[0], five[2], five[1]]} (release)")
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


# --- names that map one to one ------------------------------------------------------------------
def _renamed(config: Qwen3VLConfig) -> list[tuple[str, str]]:
    """(our name, HF name) of every tensor copied unchanged."""
    pairs = [("embedding.word_embeddings.weight", HF_LLM + "embed_tokens.weight"),
             ("decoder.final_layernorm.weight", HF_LLM + "norm.weight"),
             ("vision.patch_embed.proj.bias", HF_VIT + "patch_embed.proj.bias"),
             ("vision.pos_embed.weight", HF_VIT + "pos_embed.weight")]
    if not config.tie_word_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight"))
    for n in range(config.vision.depth):
        pairs += [(f"vision.layers.{n}.{a}", f"{HF_VIT}blocks.{n}.{b}") for a, b in _VIT_BLOCK.items()]
    mergers = [("vision.merger.", HF_VIT + "merger.")] + [
        (f"vision.deepstack_merger_list.{j}.", f"{HF_VIT}deepstack_merger_list.{j}.")
        for j in range(config.num_deepstack_layers)]
    pairs += [(ours + a, theirs + b) for ours, theirs in mergers for a, b in _MERGER.items()]
    for i in range(config.text.num_layers):
        pairs += [(f"decoder.layers.{i}.{a}", f"{HF_LLM}layers.{i}.{b}") for a, b in _LLM_LAYER.items()]
        if config.text.is_moe_layer(i):
            pairs.append((f"decoder.layers.{i}.mlp.router.weight", f"{HF_LLM}layers.{i}.mlp.gate.weight"))
        else:
            pairs.append((f"decoder.layers.{i}.mlp.linear_fc2.weight", f"{HF_LLM}layers.{i}.mlp.down_proj.weight"))
    return pairs


# --- HF -> ours -------------------------------------------------------------------------------------
def hf_to_mcore_state_dict(hf_sd: dict[str, torch.Tensor], config: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    """HF names/layout (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``) -> our full model."""
    v, t = config.vision, config.text
    out = {ours: hf_sd[theirs] for ours, theirs in _renamed(config)}
    out["vision.patch_embed.proj.weight"] = hf_sd[HF_VIT + "patch_embed.proj.weight"].reshape(v.hidden_size, -1)
    for n in range(v.depth):
        for kind in ("weight", "bias"):
            q, k, val = hf_sd[f"{HF_VIT}blocks.{n}.attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"vision.layers.{n}.self_attention.linear_qkv.{kind}"] = _qkv_to_grouped(q, k, val, v.num_heads)
    for i in range(t.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"{HF_LLM}layers.{i}."
        attn = theirs + "self_attn."
        out[ours + "self_attention.linear_qkv.weight"] = _qkv_to_grouped(
            hf_sd[attn + "q_proj.weight"], hf_sd[attn + "k_proj.weight"], hf_sd[attn + "v_proj.weight"],
            t.num_key_value_heads)
        if t.is_moe_layer(i):
            gate_up, down = _expert_tensors(hf_sd, theirs + "mlp.experts.", config)
            for e in range(t.num_experts):
                out[ours + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
                out[ours + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
        else:
            out[ours + "mlp.linear_fc1.weight"] = torch.cat(
                [hf_sd[theirs + "mlp.gate_proj.weight"], hf_sd[theirs + "mlp.up_proj.weight"]], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


# --- ours -> HF -------------------------------------------------------------------------------------
def mcore_to_hf_state_dict(sd: dict[str, torch.Tensor], config: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    """Our full model's state dict -> HF names in the transformers 5.x layout (no lm_head when tied)."""
    v, t = config.vision, config.text
    out = {theirs: sd[ours] for ours, theirs in _renamed(config)}
    out[HF_VIT + "patch_embed.proj.weight"] = sd["vision.patch_embed.proj.weight"].reshape(
        v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    for n in range(v.depth):
        for kind in ("weight", "bias"):
            q, k, val = _grouped_to_qkv(sd[f"vision.layers.{n}.self_attention.linear_qkv.{kind}"], v.num_heads,
                                        v.head_dim, v.head_dim)
            out[f"{HF_VIT}blocks.{n}.attn.qkv.{kind}"] = torch.cat([q, k, val], dim=0)
    ratio = t.num_attention_heads // t.num_key_value_heads
    for i in range(t.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"{HF_LLM}layers.{i}."
        q, k, val = _grouped_to_qkv(sd[ours + "self_attention.linear_qkv.weight"], t.num_key_value_heads,
                                    ratio * t.head_dim, t.head_dim)
        out.update({theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                    theirs + "self_attn.v_proj.weight": val})
        if t.is_moe_layer(i):
            experts = [f"{ours}mlp.experts.local_experts.{e}." for e in range(t.num_experts)]
            out[theirs + "mlp.experts.gate_up_proj"] = torch.stack([sd[e + "linear_fc1.weight"] for e in experts])
            out[theirs + "mlp.experts.down_proj"] = torch.stack([sd[e + "linear_fc2.weight"] for e in experts])
        else:
            gate, up = sd[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out.update({theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up})
    return {k: v.contiguous() for k, v in out.items()}
