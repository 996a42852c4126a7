"""How a run is split over ranks, and every rule a split must follow, checked before any process group exists.

``ParallelLayout`` holds the model-parallel degrees (tp, pp, vpp, cp, ep, etp, sequence_parallel) and the
optional uneven pipeline split; the data-parallel degree follows from the world size. This module is the one
home of the layout rules: the training config checks, the model build, ``qwen3vl-convert verify`` and the
docs' rule table (``RULES``, mirrored in docs/parallel.md) all call the functions below. ``problems`` is pure
(no torch.distributed) and reports every broken rule at once, each with what to change; ``validate`` raises
them as one ``LayoutError``.

Messages name fields by their layout names (``tp``, ``seq_length``); a caller with other names (the training
config's ``parallel.tp``, ``train.seq_length``) passes ``prefix`` / ``seq_field``.

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent, pipeline stages are
the outermost split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


class LayoutError(ValueError):
    """A parallel layout that cannot run; ``problems`` lists each rule broken and what to change."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid parallel layout ({len(self.problems)} problem(s)):\n{lines}")


# parallel.cp_comm_type: what transformer-engine's attention takes, and what the built-in attention
# (PackedCoreAttention: one all-gather of K/V, exact and cheap under GQA) serves, p2p included.
CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")
ALL_GATHER_CP_COMM_TYPES = ("p2p", "all_gather")

# (rule, why): the table of docs/parallel.md, which a test keeps equal to this list.
RULES = (
    ("world size divisible by tp·pp·cp (and by etp·ep·pp with experts)",
     "every rank needs a place in every group"),
    ("attention heads and query groups divisible by tp, and the ViT's heads too",
     "TP splits heads; each rank needs whole KV groups; the ViT shares the LLM's TP"),
    ("layers divisible by pp·vpp, unless `pipeline_layers` gives one count (≥ 0) per (virtual) stage summing "
     "to the layers", "every (virtual) stage builds its share; a stage may hold 0 layers (e.g. `[3, 0, 0, 1]` "
     "on pp2·vpp2)"),
    ("the first `deepstack_layers` LLM layers (0, 1, 2 for Qwen3-VL) on the first stage (the first virtual "
     "chunk of rank 0 with vpp)", "DeepStack adds visual features after those layers, where the vision "
     "tower's output lives"),
    ("experts divisible by ep; ep > 1 only with experts", "EP splits whole experts"),
    ("MoE with tp > 1 needs sequence_parallel", "megatron's MoE layer refuses to train otherwise"),
    ("seq_length (every packed segment) divisible by 2·cp, ×tp with sequence parallelism",
     "CP cuts each segment into 2·cp mirrored chunks; SP splits each chunk over TP"),
    ("micro-batches per step divisible by pp with vpp", "megatron's interleaved schedule runs micro-batches "
     "in groups of pp"),
    ("sequence_parallel needs tp > 1; vpp ≥ 2 and needs pp ≥ 2", "degenerate settings are refused rather "
     "than silently ignored"),
)


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel (stages)
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved 1F1B); None = not interleaved
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    etp: Optional[int] = None  # expert tensor parallel; None = same as tp
    sequence_parallel: bool = False
    # Explicit (uneven) split: LLM layers per pipeline stage, or per virtual stage in model order with vpp
    # (stage 0 chunk 0, stage 1 chunk 0, ..., stage 0 chunk 1, ...); None = even split.
    pipeline_layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.pipeline_layers is not None and not isinstance(self.pipeline_layers, tuple):
            object.__setattr__(self, "pipeline_layers", tuple(self.pipeline_layers))

    # --- derived numbers: each has one definition, here -----------------------------------------
    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the dense model: tp·pp·cp."""
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def num_stages(self) -> int:
        """(Virtual) pipeline stages: pp·vpp."""
        return self.pp * (self.vpp or 1)

    @property
    def sequence_multiple(self) -> int:
        """Every packed segment (hence every sequence) is a multiple of this: 2·cp so context parallelism can
        cut it into 2·cp zig-zag chunks (1 without CP), times tp with sequence parallelism so each chunk
        splits evenly over the TP ranks."""
        multiple = 2 * self.cp if self.cp > 1 else 1
        return multiple * self.tp if self.sequence_parallel else multiple

    @property
    def microbatch_multiple(self) -> int:
        """Micro-batches per step must be a multiple of this: pp for the interleaved schedule, else 1."""
        return self.pp if self.vpp is not None else 1

    def dp(self, world_size: int) -> int:
        """Data-parallel degree for ``world_size`` ranks (validate first: it must divide evenly)."""
        if world_size % self.model_parallel_size:
            raise LayoutError([_world_size_message(world_size, self)])
        return world_size // self.model_parallel_size

    def stage_layers(self, num_layers: int) -> list[int]:
        """LLM layers built by each (virtual) pipeline stage, in model order (``pipeline_problems`` first)."""
        if self.pipeline_layers is not None:
            return list(self.pipeline_layers)
        return [num_layers // self.num_stages] * self.num_stages

    # --- the rules -------------------------------------------------------------------------------
    def pipeline_problems(self, num_layers: int, deepstack_layers: int, prefix: str = "") -> list[str]:
        """The split of ``num_layers`` over the (virtual) stages, and DeepStack's layers on the first one."""
        stages, stage_word = self.num_stages, f"{prefix}pp·{prefix}vpp" if self.vpp else f"{prefix}pp"
        split = self.pipeline_layers
        found = []
        if split is not None:
            if len(split) != stages:
                return [f"{prefix}pipeline_layers has {len(split)} entries but there are {stages} (virtual) "
                        f"pipeline stages ({stage_word}): give one layer count per stage"]
            if sum(split) != num_layers:
                found.append(f"{prefix}pipeline_layers {list(split)} sums to {sum(split)}, not num_layers="
                             f"{num_layers}: make the per-stage counts add up to {num_layers}")
            if min(split) < 0:
                found.append(f"{prefix}pipeline_layers {list(split)} has a negative layer count: give every "
                             "stage 0 or more layers")
        elif num_layers % stages:
            found.append(f"num_layers={num_layers} is not divisible by {stage_word} = {stages}: change "
                         f"{prefix}pp{'/vpp' if self.vpp else ''}, or give an explicit uneven split "
                         f"{prefix}pipeline_layers")
        first = self.stage_layers(num_layers)[0]
        if stages > 1 and first < deepstack_layers:
            where = "the first virtual chunk of pipeline rank 0" if self.vpp else "the first pipeline stage"
            found.append(f"DeepStack injects visual features after LLM layers 0..{deepstack_layers - 1}, so "
                         f"those {deepstack_layers} layers must be on {where}, which holds only {first}: "
                         f"reduce {stage_word} or give {prefix}pipeline_layers with at least {deepstack_layers} "
                         f"layers first")
        return found

    def sequence_problems(self, seq_length: int, prefix: str = "", seq_field: str = "seq_length") -> list[str]:
        """``seq_length`` must be a multiple of ``sequence_multiple``; the fix names the nearest lengths."""
        multiple = self.sequence_multiple
        if seq_length % multiple == 0:
            return []
        why = [f"2·{prefix}cp = {2 * self.cp}"] if self.cp > 1 else []
        if self.sequence_parallel:
            why.append(f"{prefix}tp = {self.tp} (sequence parallel)")
        cut = ("context parallelism cuts every sequence into 2·cp equal chunks" if self.cp > 1 else
               "sequence parallelism splits every sequence over the TP ranks")
        lower = seq_length // multiple * multiple
        return [f"{seq_field}={seq_length} is not divisible by {multiple} ({' × '.join(why)}): {cut}; use "
                f"{seq_field}={lower or multiple} or {lower + multiple}, or change {prefix}cp"]

    def microbatch_problems(self, num_microbatches: int, prefix: str = "", fix: Optional[str] = None) -> list[str]:
        """The interleaved schedule runs micro-batches in groups of pp."""
        multiple = self.microbatch_multiple
        if num_microbatches % multiple == 0:
            return []
        fix = fix or f"use a multiple of {multiple} micro-batches (global batch / (micro batch · dp))"
        return [f"num_microbatches={num_microbatches} (per step and DP rank) is not divisible by {prefix}pp="
                f"{self.pp}, which the interleaved schedule ({prefix}vpp={self.vpp}) requires: {fix} or set "
                f"{prefix}vpp=None"]

    def problems(self, world_size: int, *, num_attention_heads: int, num_query_groups: int,
                 num_layers: int, num_experts: Optional[int] = None, seq_length: Optional[int] = None,
                 num_microbatches: Optional[int] = None, deepstack_layers: int = 3,
                 vision_heads: Optional[int] = None, prefix: str = "") -> list[str]:
        """Every rule this layout breaks for this model and run, as messages saying what to change."""
        found = _degree_problems(self, prefix)
        if found:  # the remaining rules divide by the degrees: they need valid ones
            return found
        if world_size % self.model_parallel_size:
            found.append(_world_size_message(world_size, self))
        expert_span = self.expert_tp * self.ep * self.pp
        if (self.ep > 1 or self.etp is not None) and world_size % expert_span:
            found.append(
                f"world size {world_size} is not divisible by etp·ep·pp = {self.expert_tp}·{self.ep}·"
                f"{self.pp} = {expert_span}: change {prefix}ep or {prefix}etp, or use a multiple of "
                f"{expert_span} ranks")
        if num_attention_heads % self.tp:
            found.append(f"num_attention_heads={num_attention_heads} is not divisible by tp={self.tp}: "
                         f"choose {prefix}tp among the divisors of {num_attention_heads}")
        if num_query_groups % self.tp:
            found.append(f"num_query_groups={num_query_groups} (KV heads) is not divisible by tp={self.tp}: "
                         f"choose {prefix}tp among the divisors of {num_query_groups}")
        if vision_heads and vision_heads % self.tp:
            found.append(f"{prefix}tp={self.tp} does not divide the {vision_heads} ViT heads (the ViT shares "
                         f"the LLM's tensor parallelism): choose {prefix}tp among the divisors of {vision_heads}")
        found += self.pipeline_problems(num_layers, deepstack_layers, prefix)
        found += _expert_problems(self, num_experts, prefix)
        if seq_length is not None:
            found += self.sequence_problems(seq_length, prefix)
        if self.sequence_parallel and self.tp == 1:
            found.append(f"{prefix}sequence_parallel=True needs tp > 1 (it splits activations over the TP "
                         f"group): set {prefix}sequence_parallel=False or {prefix}tp >= 2")
        if num_microbatches is not None:
            found += self.microbatch_problems(num_microbatches, prefix)
        return found

    def validate(self, world_size: int, **model_and_run) -> "ParallelLayout":
        """Raise one ``LayoutError`` listing every broken rule; returns self when the layout is valid.

        Keyword arguments: see ``problems`` (num_attention_heads, num_query_groups, num_layers required).
        """
        found = self.problems(world_size, **model_and_run)
        if found:
            raise LayoutError(found)
        return self


def _world_size_message(world_size: int, layout: ParallelLayout) -> str:
    span = layout.model_parallel_size
    return (f"world size {world_size} is not divisible by tp·pp·cp = {layout.tp}·{layout.pp}·{layout.cp} "
            f"= {span}: use a multiple of {span} ranks or reduce tp, pp or cp")


def _degree_problems(layout: ParallelLayout, prefix: str) -> list[str]:
    found = []
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(layout, name) < 1:
            found.append(f"{prefix}{name}={getattr(layout, name)} must be at least 1")
    if layout.etp is not None and layout.etp < 1:
        found.append(f"{prefix}etp={layout.etp} must be at least 1 (or None to follow tp)")
    if layout.vpp is not None:
        if layout.vpp < 2:
            found.append(f"{prefix}vpp={layout.vpp}: use vpp=None for the non-interleaved schedule, or vpp >= 2")
        if layout.pp < 2:
            found.append(f"{prefix}vpp={layout.vpp} (interleaved pipeline) needs pp >= 2: set {prefix}pp >= 2 "
                         f"or {prefix}vpp=None")
    return found


def _expert_problems(layout: ParallelLayout, num_experts: Optional[int], prefix: str) -> list[str]:
    if not num_experts:
        if layout.ep > 1:
            return [f"{prefix}ep={layout.ep} but the model has no experts: set {prefix}ep=1 (or use a MoE model)"]
        return []
    found = []
    if num_experts % layout.ep:
        found.append(f"num_experts={num_experts} is not divisible by ep={layout.ep}: choose {prefix}ep among "
                     f"the divisors of {num_experts}")
    if layout.tp > 1 and not layout.sequence_parallel:
        found.append(f"a MoE model with tp={layout.tp} needs sequence_parallel=True (megatron's MoE layer "
                     f"refuses to train otherwise): set {prefix}sequence_parallel=True or {prefix}tp=1")
    return found
