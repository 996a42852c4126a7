"""How a run is split over ranks, checked before any process group exists.

``ParallelLayout`` holds the model-parallel degrees (tp, pp, vpp, cp, ep, etp, sequence_parallel);
the data-parallel degree follows from the world size. ``validate`` is pure (no torch.distributed),
so a training config can call it at load time, and it reports every violated rule at once, each with
what to change, in one ``LayoutError``.

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent, pipeline
stages are the outermost split.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence


class LayoutError(ValueError):
    """A parallel layout that cannot run; ``problems`` lists each rule broken and what to change."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid parallel layout ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class ModelDims:
    """The model sizes the layout rules depend on (the language model's, for a VLM).

    ``deepstack_layers``: how many leading LLM layers receive DeepStack visual features (Qwen3-VL
    injects after layers 0, 1, 2); they must all be built on the first pipeline stage. 0 for text-only.
    ``pipeline_layers``: optional explicit (uneven) split, layers per pipeline stage, or per virtual
    stage in model order when vpp is set.
    """

    num_attention_heads: int
    num_query_groups: int
    num_layers: int
    num_experts: Optional[int] = None
    deepstack_layers: int = 3
    pipeline_layers: Optional[tuple[int, ...]] = None

    def as_kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel (stages)
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved 1F1B); None = not interleaved
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    etp: Optional[int] = None  # expert tensor parallel; None = same as tp
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the dense model: tp·pp·cp."""
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def sequence_multiple(self) -> int:
        """Every packed segment (hence every sequence) is a multiple of this: 2·cp so context parallelism can
        cut it into 2·cp zig-zag chunks (1 without CP), times tp with sequence parallelism so each chunk
        splits evenly over the TP ranks."""
        multiple = 2 * self.cp if self.cp > 1 else 1
        return multiple * self.tp if self.sequence_parallel else multiple

    def dp(self, world_size: int) -> int:
        """Data-parallel degree for ``world_size`` ranks (validate first: it must divide evenly)."""
        if world_size % self.model_parallel_size:
            raise LayoutError([_world_size_message(world_size, self)])
        return world_size // self.model_parallel_size

    def layers_per_virtual_stage(self, num_layers: int,
                                 pipeline_layers: Optional[Sequence[int]] = None) -> list[int]:
        """Layers built by each (virtual) pipeline stage, in model order."""
        stages = self.pp * (self.vpp or 1)
        if pipeline_layers is not None:
            return list(pipeline_layers)
        return [num_layers // stages] * stages

    def problems(self, world_size: int, *, num_attention_heads: int, num_query_groups: int,
                 num_layers: int, num_experts: Optional[int] = None, seq_length: Optional[int] = None,
                 num_microbatches: Optional[int] = None,
                 pipeline_layers: Optional[Sequence[int]] = None, deepstack_layers: int = 3) -> list[str]:
        """Every rule this layout breaks for this model and run, as messages saying what to change."""
        found = _degree_problems(self)
        if found:  # the remaining rules divide by the degrees: they need valid ones
            return found
        if world_size % self.model_parallel_size:
            found.append(_world_size_message(world_size, self))
        expert_span = self.expert_tp * self.ep * self.pp
        if self.ep > 1 or self.etp is not None:
            if world_size % expert_span:
                found.append(
                    f"world size {world_size} is not divisible by etp·ep·pp = {self.expert_tp}·{self.ep}·"
                    f"{self.pp} = {expert_span}: change ep or etp, or use a multiple of {expert_span} ranks")
        if num_attention_heads % self.tp:
            found.append(f"num_attention_heads={num_attention_heads} is not divisible by tp={self.tp}: "
                         f"choose tp among the divisors of {num_attention_heads}")
        if num_query_groups % self.tp:
            found.append(f"num_query_groups={num_query_groups} (KV heads) is not divisible by tp={self.tp}: "
                         f"choose tp among the divisors of {num_query_groups}")
        found += _pipeline_problems(self, num_layers, pipeline_layers, deepstack_layers)
        found += _expert_problems(self, num_experts)
        if seq_length is not None:
            found += _sequence_problems(self, seq_length)
        if self.sequence_parallel and self.tp == 1:
            found.append("sequence_parallel=True needs tp > 1 (it splits activations over the TP group): "
                         "set sequence_parallel=False or tp >= 2")
        if self.vpp is not None and num_microbatches is not None and num_microbatches % self.pp:
            found.append(f"num_microbatches={num_microbatches} is not divisible by pp={self.pp}, which the "
                         f"interleaved schedule (vpp={self.vpp}) requires: use a multiple of {self.pp} "
                         f"micro-batches (global batch / (micro batch · dp)) or set vpp=None")
        return found

    def validate(self, world_size: int, **model_and_run) -> "ParallelLayout":
        """Raise one ``LayoutError`` listing every broken rule; returns self when the layout is valid.

        Keyword arguments: see ``problems`` (num_attention_heads, num_query_groups, num_layers required).
        """
        found = self.problems(world_size, **model_and_run)
        if found:
            raise LayoutError(found)
        return self

    def validate_for(self, world_size: int, dims: ModelDims, *, seq_length: Optional[int] = None,
                     num_microbatches: Optional[int] = None) -> "ParallelLayout":
        """``validate`` with the model sizes given as a ``ModelDims``."""
        return self.validate(world_size, seq_length=seq_length, num_microbatches=num_microbatches,
                             **dims.as_kwargs())


def _world_size_message(world_size: int, layout: ParallelLayout) -> str:
    span = layout.model_parallel_size
    return (f"world size {world_size} is not divisible by tp·pp·cp = {layout.tp}·{layout.pp}·{layout.cp} "
            f"= {span}: use a multiple of {span} ranks or reduce tp, pp or cp")


def _degree_problems(layout: ParallelLayout) -> list[str]:
    found = []
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(layout, name) < 1:
            found.append(f"{name}={getattr(layout, name)} must be at least 1")
    if layout.etp is not None and layout.etp < 1:
        found.append(f"etp={layout.etp} must be at least 1 (or None to follow tp)")
    if layout.vpp is not None:
        if layout.vpp < 2:
            found.append(f"vpp={layout.vpp}: use vpp=None for the non-interleaved schedule, or vpp >= 2")
        if layout.pp < 2:
            found.append(f"vpp={layout.vpp} (interleaved pipeline) needs pp >= 2: set pp >= 2 or vpp=None")
    return found


def _pipeline_problems(layout: ParallelLayout, num_layers: int, pipeline_layers: Optional[Sequence[int]],
                       deepstack_layers: int) -> list[str]:
    stages = layout.pp * (layout.vpp or 1)
    stage_word = "pp·vpp" if layout.vpp else "pp"
    found = []
    if pipeline_layers is not None:
        pipeline_layers = list(pipeline_layers)
        if len(pipeline_layers) != stages:
            return [f"pipeline_layers has {len(pipeline_layers)} entries but there are {stages} "
                    f"(virtual) pipeline stages ({stage_word}): give one layer count per stage"]
        if sum(pipeline_layers) != num_layers:
            found.append(f"pipeline_layers {pipeline_layers} sums to {sum(pipeline_layers)}, not "
                         f"num_layers={num_layers}: make the per-stage counts add up to {num_layers}")
        if min(pipeline_layers) < 1:
            found.append(f"pipeline_layers {pipeline_layers} leaves a stage without layers: give every "
                         f"stage at least one layer or reduce pp")
    elif num_layers % stages:
        found.append(f"num_layers={num_layers} is not divisible by {stage_word} = {stages}: change pp"
                     f"{'/vpp' if layout.vpp else ''}, or give an explicit uneven split pipeline_layers")
    first_stage = layout.layers_per_virtual_stage(num_layers, pipeline_layers)[0]
    if stages > 1 and first_stage < deepstack_layers:
        where = "the first virtual chunk of pipeline rank 0" if layout.vpp else "the first pipeline stage"
        found.append(f"DeepStack injects visual features after LLM layers 0..{deepstack_layers - 1}, so "
                     f"those {deepstack_layers} layers must be on {where}, which holds only {first_stage}: "
                     f"reduce {stage_word} or give pipeline_layers with at least {deepstack_layers} "
                     f"layers first")
    return found


def _expert_problems(layout: ParallelLayout, num_experts: Optional[int]) -> list[str]:
    if not num_experts:
        if layout.ep > 1:
            return [f"ep={layout.ep} but the model has no experts: set ep=1 (or use a MoE model)"]
        return []
    found = []
    if num_experts % layout.ep:
        found.append(f"num_experts={num_experts} is not divisible by ep={layout.ep}: choose ep among the "
                     f"divisors of {num_experts}")
    if layout.tp > 1 and not layout.sequence_parallel:
        found.append(f"a MoE model with tp={layout.tp} needs sequence_parallel=True (megatron's MoE layer "
                     f"refuses to train otherwise): set sequence_parallel=True or tp=1")
    return found


def _sequence_problems(layout: ParallelLayout, seq_length: int) -> list[str]:
    multiple = layout.sequence_multiple
    if seq_length % multiple == 0:
        return []
    parts = []
    if layout.cp > 1:
        parts.append(f"2·cp = {2 * layout.cp} (each rank gets two mirrored chunks for causal load balance)")
    if layout.sequence_parallel:
        parts.append(f"tp = {layout.tp} (sequence parallelism splits the sequence over TP)")
    return [f"seq_length={seq_length} is not divisible by {multiple} = " + " × ".join(parts)
            + f": use a seq_length that is a multiple of {multiple}"]
