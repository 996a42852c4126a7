"""The weight table of an assembled model: Qwen3 LLM + SigLIP-2 vision tower -> our Qwen3-VL, mergers fresh.

Names on the source side carry the part they come from: ``llm/<name>``, ``vision/<name>``, and
``fresh/<our name>`` for what no part has (the final merger and the DeepStack mergers).

* LLM: the Qwen3-VL decoder table itself (``hf_weights.llm_weights``), under the causal LM's ``model.``
  prefix, experts one tensor each; every weight carried as is.
* ViT blocks: q/k/v fused into our per-head ``linear_qkv``; out_proj, fc1/fc2 and both LayerNorms copied.
* Patch embedding: SigLIP-2 embeds a 16x16 patch flattened as (row, column, channel) with a Linear
  (SigLIP: a Conv2d, (channel, row, column)). Ours is the Conv3d over two temporal frames, flattened
  (channel, time, row, column): each frame gets SigLIP's kernel halved, so a still image (two identical
  frames) gives exactly SigLIP's patch features, and a video frame pair their average.
* Position table: SigLIP's square table resampled to the preset's grid with the bilinear, align-corners
  rule of ``qwen3vl.model.vision_pos_embed`` (copied unchanged when the grids agree).
* Fresh (seeded; each tensor from its own generator, seeded by the seed and its name, so the result
  does not depend on order or threads): Linear weights N(0, 0.02^2) (transformers' initializer_range for
  Qwen3-VL), biases 0, LayerNorm weight 1 and bias 0.
Not carried: SigLIP-2's post-layernorm and pooling head (Qwen3-VL's mergers read the last block's output),
its text tower, and anything else the table does not name; the command lists them.
"""
from __future__ import annotations

import zlib

import torch

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.interop.hf_weights import group_qkv, llm_weights
from qwen3vl.model.interop.weight_table import Mapping, Transform, Weight, expand
from qwen3vl.model.vision_pos_embed import VisionPositionEmbedding

LLM, VISION, FRESH = "llm", "vision", "fresh"  # source names are "<part>/<name in that part>"
INIT_STD = 0.02


class SiglipPatchEmbed(Transform):
    """SigLIP-2 Linear [D, P·P·C] (row, col, channel) or SigLIP Conv2d [D, C, P, P] -> ours [D, C·T·P·P]."""

    def to_ours(self, theirs, config):
        v = config.vision
        weight = theirs[0]
        if weight.dim() == 2:
            weight = weight.reshape(v.hidden_size, v.patch_size, v.patch_size, v.in_channels).permute(0, 3, 1, 2)
        frames = weight.unsqueeze(2).expand(-1, -1, v.temporal_patch_size, -1, -1) / v.temporal_patch_size
        return [frames.reshape(v.hidden_size, -1)]


class ResampledPositions(Transform):
    """SigLIP's [S², D] table -> ours [G², D] on the preset's grid (bilinear, align corners)."""

    def to_ours(self, theirs, config):
        table, side = theirs[0], config.vision.position_grid_side
        if table.shape[0] == side * side:
            return [table]
        with torch.device("meta"):
            resampler = VisionPositionEmbedding(table.shape[0], table.shape[1], config.vision.spatial_merge_size,
                                                table.dtype)
        resampler.weight = torch.nn.Parameter(table, requires_grad=False)
        with torch.no_grad():
            return [resampler.resample(side, side)]


class SeparateQKV(Transform):
    """SigLIP (q_proj, k_proj, v_proj) -> our per-head grouped ``linear_qkv`` (weight or bias)."""

    def to_ours(self, theirs, config):
        return [group_qkv(*theirs, config.vision.num_heads)]


def _merger_weights(prefix: str) -> list[Weight]:
    return [Weight(f"{prefix}.{part}.{kind}", f"{FRESH}/{prefix}.{part}.{kind}")
            for part in ("norm", "linear_fc1", "linear_fc2") for kind in ("weight", "bias")]


def _vision_weights(prefix: str) -> tuple[Weight, ...]:
    block = f"{VISION}/{prefix}encoder.layers.{{n}}."
    return (
        Weight("vision.patch_embed.proj.weight", f"{VISION}/{prefix}embeddings.patch_embedding.weight",
               SiglipPatchEmbed()),
        Weight("vision.patch_embed.proj.bias", f"{VISION}/{prefix}embeddings.patch_embedding.bias"),
        Weight("vision.pos_embed.weight", f"{VISION}/{prefix}embeddings.position_embedding.weight",
               ResampledPositions()),
        *(Weight(f"vision.layers.{{n}}.{ours}.{kind}", f"{block}{theirs}.{kind}")
          for ours, theirs in (("input_layernorm", "layer_norm1"), ("pre_mlp_layernorm", "layer_norm2"),
                               ("self_attention.linear_proj", "self_attn.out_proj"), ("mlp.linear_fc1", "mlp.fc1"),
                               ("mlp.linear_fc2", "mlp.fc2"))
          for kind in ("weight", "bias")),
        *(Weight(f"vision.layers.{{n}}.self_attention.linear_qkv.{kind}",
                 tuple(f"{block}self_attn.{x}_proj.{kind}" for x in "qkv"), SeparateQKV())
          for kind in ("weight", "bias")),
        *_merger_weights("vision.merger"),
        *_merger_weights("vision.deepstack_merger_list.{j}"),
    )


def assembly_mappings(config: Qwen3VLConfig, vision_prefix: str) -> list[Mapping]:
    """Every weight of the assembled model with its source (``llm/``, ``vision/`` or ``fresh/`` names)."""
    llm = tuple(Weight(w.ours, tuple(f"{LLM}/{n}" for n in ((w.theirs,) if isinstance(w.theirs, str) else w.theirs)),
                       w.transform, w.layers, w.when)
                for w in llm_weights("model.", experts="per_expert"))
    return expand(_vision_weights(vision_prefix) + llm, config)


def fresh_tensor(name: str, config: Qwen3VLConfig, seed: int) -> torch.Tensor:
    """The freshly initialised merger tensor ``name`` (our name), seeded by ``seed`` and the name."""
    v = config.vision
    merged, deepstack = v.merged_hidden_size, ".deepstack_merger_list." in name
    part, kind = name.split(".")[-2:]
    shapes = {"norm": (merged if deepstack else v.hidden_size,), "linear_fc1": (merged, merged),
              "linear_fc2": (v.out_hidden_size, merged)}
    shape = shapes[part] if kind == "weight" else shapes[part][:1]
    if part == "norm":
        return torch.ones(shape) if kind == "weight" else torch.zeros(shape)
    if kind == "bias":
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator).mul_(INIT_STD)
