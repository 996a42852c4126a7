"""Activation memory per rank: bytes saved for backward per LLM layer token and per ViT block patch.

Every term is a tensor this code base saves for backward, read off
``torch.autograd.graph.saved_tensors_hooks`` on a real step (deduplicated by storage, parameters left
out); ``qwen3vl-plan --measure`` runs such a step and prints the prediction next to the measurement.
Sizes: H hidden, q = heads·head_dim, kv = KV heads·head_dim, d head_dim, F FFN, V vocabulary, D ViT
width, e the activation element size (2 in bf16); fp32 terms are 4 bytes whatever e.

Per LLM layer and token (no recompute): the two RMSNorms keep an fp32 copy of their input and their
rsqrt (2·(4H + 4 + eH)); the QKV and MLP linears their inputs (2·eH); QK-norm the same per head
(4q + 4·heads + eq, 4kv + 4·kv_heads + e·kv); RoPE four cos/sin tables (4·e·d); attention the gathered
q, k, v, its output, log-sum-exp and the output gathered back (3eq + 2e·kv + 4·heads, plus 24 bytes of
row indices); the output projection its input (eq); SwiGLU the fc1 output and three F-wide tensors
(5eF). A MoE layer instead keeps the router's logits, probabilities, top-k and routing map
(28k + (5 + e)·E + 1 for E experts, top-k k), the permuted tokens (e·k·H) and per routed token the
expert's SwiGLU (6e·f for expert FFN f, plus its probability e). With e = 2 a dense 2B layer saves
65.6 bytes per token per hidden unit.

Parallel splits: sequence parallelism divides the norm and linear-input terms by TP; TP divides
everything per head or FFN column; CP divides every term by CP except the gathered keys and values,
of which each rank keeps its chunks' prefixes, (2cp + 1)/(2cp) of the segment. Recompute: ``selective``
redoes megatron's ``recompute_modules``: ``core_attn`` replaces the attention terms by q, k and the fused
QKV output it holds; ``layernorm`` drops both norms' terms (each checkpoint keeps its input, in the bytes
its output took as the next linear's input); ``mlp`` / ``moe`` drop the MLP's (its input is kept); ``full``
keeps each recomputed unit's input (e·H; plus, once per chunk, the fp32 RoPE tables and the DeepStack
features its checkpoints also take) and rebuilds one unit at a time in backward (a transient);
``vision`` does the same per ViT block.

Per ViT block and patch: LayerNorm statistics and the three D-wide norm inputs/outputs (4e + 3eD),
attention (gathered q, k, v, output, output gathered back: 5eD, 4·heads, 24 bytes of indices), the
projection input (eD) and the GELU MLP's fc1 output and activation (2e·F_vit); with e = 2 a 2B ViT
block saves 34.1 bytes per patch per channel. The attention and MLP terms divide by TP (the ViT has no
sequence parallelism), every term by CP (frame groups are spread over the CP ranks). The mergers keep
their norm and fc1 inputs and the GELU's input and output; the merged and DeepStack features of the
whole row are gathered back to every CP rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.train.config import RecomputeCfg
from qwen3vl.train.freeze import PARTS

FP32 = 4
INDEX = 8  # int64 row indices
ALL = frozenset(PARTS)  # every part trains


@dataclass(frozen=True)
class Row:
    """One micro-batch: ``tokens`` of a packed row (global, before CP), ``patches`` of its media."""

    tokens: int
    patches: int
    element: int = 2  # activation bytes per element (bf16)
    labelled: Optional[float] = None  # tokens with a label; None: all but the visual ones (a full row)


# ---- LLM -------------------------------------------------------------------------------------------

def llm_layer(config: Qwen3VLConfig, row: Row, layout: ParallelLayout, moe: bool,
              recompute: RecomputeCfg = RecomputeCfg(), frozen: bool = False) -> float:
    """Bytes one LLM layer saves for one micro-batch on one rank (no full recompute; ``recompute``: the
    run's setting, of which only selective recompute counts here). ``frozen``: its weights do not train but gradients
    pass through it (stage 0), so what only the weight gradients need is not kept: the linears' inputs
    and the norms' normalised outputs."""
    t, e = config.text, row.element
    tp, cp = layout.tp, layout.cp
    sp = tp if layout.sequence_parallel else 1
    H, d = t.hidden_size, t.head_dim
    q, kv, heads, kv_heads = t.num_attention_heads * d, t.num_key_value_heads * d, t.num_attention_heads, \
        t.num_key_value_heads
    local = row.tokens / cp  # this CP rank's rows
    keys = row.tokens * (2 * cp + 1) / (2 * cp) if cp > 1 else row.tokens  # the gathered prefixes it keeps
    norms = local / sp * 2 * (4 * H + 4 + e * H)  # each: fp32 input, 1/rms, normalised output
    linear_inputs = local / sp * 2 * e * H  # QKV's and the MLP's (or router's): the norms' outputs
    if recompute.redoes("layernorm"):
        # Run without autograd; the checkpoint keeps each norm's input and frees its output once the
        # next linear saved it (refilled in backward): the linear inputs' bytes are the inputs now.
        norms = 0.0
    qk_norm = local / tp * (4 * q + 4 * heads + e * q + 4 * kv + 4 * kv_heads + e * kv)
    rope = local * 4 * e * d
    if recompute.redoes("core_attn"):  # keeps q, k and the fused QKV output (v is a view of it)
        attention = local / tp * (e * q + e * kv + e * (q + 2 * kv))
    else:
        attention = (local / tp * (3 * e * q + FP32 * heads) + keys / tp * 2 * e * kv + local * 3 * INDEX)
    projection = local / tp * e * q
    if moe:
        k, experts = t.num_experts_per_tok, t.num_experts
        f = t.moe_intermediate_size / layout.expert_tp
        tokens = local / sp  # the router works on the sequence-parallel shard
        routed = tokens * k * layout.expert_tp
        mlp = tokens * (28 * k + (5 + e) * experts + 1) + routed * (e * H + 6 * e * f + e)
        weight_only = routed * (e * H + e * f)  # the experts' fc1 and fc2 inputs
    else:
        mlp = local / tp * 5 * e * t.intermediate_size
        weight_only = local / tp * e * t.intermediate_size  # fc2's input
    if recompute.redoes("mlp", moe):  # the checkpoint keeps only the input (a linear input above)
        mlp = weight_only = 0.0
    if frozen:
        # No weight gradient: no linear keeps its input (a checkpoint still keeps its own), and a norm
        # keeps only what its input gradient needs.
        if recompute.redoes("layernorm"):  # the two norm checkpoints' inputs
            norms = local / sp * 2 * e * H
        else:  # and the MLP checkpoint's input where it is one
            norms = local / sp * (2 * (4 * H + 4) + (e * H if recompute.redoes("mlp", moe) else 0))
        weight_only += local / tp * (2 * e * q + e * kv)
        return norms + qk_norm + rope + attention + projection + mlp - weight_only
    return norms + linear_inputs + qk_norm + rope + attention + projection + mlp


def llm_layer_input(config: Qwen3VLConfig, row: Row, layout: ParallelLayout) -> float:
    """What a fully recomputed layer keeps: its input [T / cp (/ tp with SP), H]."""
    sp = layout.tp if layout.sequence_parallel else 1
    return row.tokens / layout.cp / sp * row.element * config.text.hidden_size


def labelled_tokens(config: Qwen3VLConfig, row: Row, layout: ParallelLayout) -> float:
    """Rows of this CP rank that carry a label: the text tokens (visual tokens have none). Only these
    reach the output layer and the cross entropy (``model/qwen3vl.py``)."""
    if row.labelled is not None:
        return row.labelled / layout.cp
    visual = row.patches / config.vision.spatial_merge_size ** 2
    return max(row.tokens - visual, 0.0) / layout.cp


def head(config: Qwen3VLConfig, row: Row, layout: ParallelLayout, frozen: bool = False) -> float:
    """The last stage: final RMSNorm over every row, the labelled rows' output-layer input and their fp32
    cross-entropy softmax [labelled, V/tp] (``frozen``: without the norm output and layer input that only
    its weight gradients need)."""
    t, e = config.text, row.element
    sp = layout.tp if layout.sequence_parallel else 1
    local, labelled = row.tokens / layout.cp, labelled_tokens(config, row, layout)
    masks = 10  # label masks and gather index per token
    weights_need = 0 if frozen else 1
    return (local / sp * (4 * t.hidden_size + 4 + weights_need * e * t.hidden_size)
            + labelled / sp * weights_need * e * t.hidden_size + labelled * (FP32 * t.vocab_size / layout.tp + masks))


def head_transient(config: Qwen3VLConfig, row: Row, layout: ParallelLayout) -> float:
    """Cross entropy's backward holds an fp32 logits gradient [labelled, V/tp] next to the saved softmax."""
    return labelled_tokens(config, row, layout) * FP32 * config.text.vocab_size / layout.tp


# ---- ViT ---------------------------------------------------------------------------------------------

def vit_block(config: Qwen3VLConfig, row: Row, layout: ParallelLayout) -> float:
    """Bytes one ViT block saves for one micro-batch on one rank (no recompute)."""
    v, e, tp = config.vision, row.element, layout.tp
    D, F = v.hidden_size, v.intermediate_size
    patches = row.patches / layout.cp
    replicated = 4 * e + 3 * e * D + 3 * INDEX
    sharded = 6 * e * D + FP32 * v.num_heads + 2 * e * F
    return patches * (replicated + sharded / tp)


def vit_block_input(config: Qwen3VLConfig, row: Row, layout: ParallelLayout) -> float:
    return row.patches / layout.cp * row.element * config.vision.hidden_size


def vision_extras(config: Qwen3VLConfig, row: Row, layout: ParallelLayout, patch_embed: bool = True) -> float:
    """Inside the vision tower besides its blocks: the patch embedding's input (when it trains) and
    the mergers."""
    v, e, tp = config.vision, row.element, layout.tp
    wide = v.hidden_size * v.spatial_merge_size ** 2
    merged_local = row.patches / layout.cp / v.spatial_merge_size ** 2
    pixels = row.patches / layout.cp * e * v.patch_dim if patch_embed else 0.0
    merger = merged_local * (4 * 4 + e * wide + 2 * e * wide / tp)
    deepstack = config.num_deepstack_layers * merged_local * (4 + 2 * e * wide + 2 * e * wide / tp)
    return pixels + merger + deepstack


def visual_features(config: Qwen3VLConfig, row: Row) -> float:
    """The merged and DeepStack features of the whole row (every CP rank gathers them) and their row
    positions, kept where they enter the LLM embedding."""
    merged = row.patches / config.vision.spatial_merge_size ** 2
    return merged * (row.element * config.text.hidden_size * (1 + config.num_deepstack_layers) + 2 * INDEX)


# ---- one pipeline rank ---------------------------------------------------------------------------

@dataclass
class StageActivations:
    saved: float = 0.0  # bytes held for backward at the peak (all micro-batches in flight)
    transient: float = 0.0  # working set on top: a recomputed unit, the loss gradient
    llm: float = 0.0  # inside the decoder layers
    vision: float = 0.0  # inside the vision tower
    other: float = 0.0  # the rest: visual features where they enter the LLM, the head and the loss

    @property
    def total(self) -> float:
        return self.saved + self.transient


def chunk_activations(config: Qwen3VLConfig, row: Row, layout: ParallelLayout, recompute: RecomputeCfg,
                      layers: range, first: bool, last: bool, trainable: frozenset = ALL) -> StageActivations:
    """Saved bytes of one model chunk (its LLM layers, the vision tower on the first, the head on the
    last) for one micro-batch, and the transient working set its backward adds. ``trainable``: the parts
    that train (qwen3vl.train.freeze); autograd keeps nothing where no gradient is needed (a frozen ViT
    with nothing trained before it) and less where only the input gradient is."""
    out = StageActivations()
    vision_trains, merger_trains, llm_trains = ("vision" in trainable, "merger" in trainable, "llm" in trainable)
    visual = bool(row.patches) and (vision_trains or merger_trains)
    if not (llm_trains or visual):
        return out  # no gradient reaches this model at all
    moe = config.text.is_moe_layer
    frozen = not llm_trains
    bytes_of = {kind: llm_layer(config, row, layout, kind, recompute, frozen) for kind in (False, True)}
    ordered = list(layers)
    full_units: list[list[int]] = []  # fully recomputed units of consecutive layers
    plain = ordered
    if recompute.granularity == "full":
        n = max(recompute.num_layers, 1)
        if recompute.method == "block":
            full_units, plain = [[i] for i in ordered[:n]], ordered[n:]
        else:
            full_units, plain = [ordered[i:i + n] for i in range(0, len(ordered), n)], []
        bytes_of = {kind: llm_layer(config, row, layout, kind, frozen=frozen) for kind in (False, True)}
    moe_plain = sum(moe(i) for i in plain)
    out.llm += bytes_of[False] * (len(plain) - moe_plain) + bytes_of[True] * moe_plain
    unit_peak = 0.0
    if full_units:
        out.llm += len(full_units) * llm_layer_input(config, row, layout)
        unit_peak = max(sum(bytes_of[moe(i)] for i in unit) for unit in {tuple(u) for u in full_units})
        # The recompute checkpoints also keep their other inputs, one copy for all layers:
        local = row.tokens / layout.cp
        out.llm += local * 2 * config.text.head_dim * FP32  # the fp32 RoPE cos/sin
        if any(i < config.num_deepstack_layers for unit in full_units for i in unit):
            sp = layout.tp if layout.sequence_parallel else 1  # and the DeepStack features
            out.llm += config.num_deepstack_layers * local / sp * row.element * config.text.hidden_size
    out.transient += unit_peak
    if first and visual:
        if vision_trains:
            block = vit_block(config, row, layout)
            depth = config.vision.depth
            if recompute.vision:
                out.vision += depth * vit_block_input(config, row, layout)
                out.transient = max(out.transient, block)
            else:
                out.vision += depth * block
        out.vision += vision_extras(config, row, layout, patch_embed=vision_trains)
        out.other += visual_features(config, row)
    if last:
        out.other += head(config, row, layout, frozen)
        out.transient += head_transient(config, row, layout)
    out.saved = out.llm + out.vision + out.other
    return out


def in_flight(layout: ParallelLayout, rank: int, microbatches: int) -> list[int]:
    """Micro-batches whose activations pipeline rank ``rank`` holds at once, per model chunk: 1F1B
    keeps pp - rank; the interleaved schedule warms up with 2·(pp - rank - 1) + (vpp - 1)·pp forward
    chunk passes (megatron's schedule), cycling through the chunks pp micro-batches at a time."""
    if layout.vpp is None:
        return [min(layout.pp - rank, microbatches)]
    vpp, pp = layout.vpp, layout.pp
    passes = min(2 * (pp - rank - 1) + (vpp - 1) * pp + 1, microbatches * vpp)
    counts = [0] * vpp
    for k in range(passes):
        counts[(k // pp) % vpp] += 1
    return counts


def rank_activations(config: Qwen3VLConfig, row: Row, layout: ParallelLayout, recompute: RecomputeCfg,
                     stage_layers: list[int], rank: int, microbatches: int,
                     trainable: frozenset = ALL) -> StageActivations:
    """Activation bytes of pipeline rank ``rank`` at its peak. ``stage_layers``: LLM layers per
    (virtual) stage in model order (``ParallelLayout.stage_layers``)."""
    vpp = layout.vpp or 1
    counts = in_flight(layout, rank, microbatches)
    out = StageActivations()
    for chunk in range(vpp):
        index = chunk * layout.pp + rank
        start = sum(stage_layers[:index])
        one = chunk_activations(config, row, layout, recompute, range(start, start + stage_layers[index]),
                                index == 0, index == len(stage_layers) - 1, trainable)
        out.saved += counts[chunk] * one.saved
        out.llm += counts[chunk] * one.llm
        out.vision += counts[chunk] * one.vision
        out.other += counts[chunk] * one.other
        out.transient = max(out.transient, one.transient)
    return out
