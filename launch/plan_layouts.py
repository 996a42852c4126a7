"""The layouts a stage can run under on N GPUs, their memory per rank, and their estimated step time.

Candidates: every TP (up to a node, dividing the attention, KV and ViT heads) × CP (powers of two) ×
PP (powers of two and divisors of the layer count, with an even split or a balanced uneven one) ×
interleaving (none, 2, 4) × EP (powers of two dividing the experts) × ETP (TP or 1) that the training
config accepts (``qwen3vl.train.config.validate``: our ``ParallelLayout`` rules and the batch
arithmetic). Sequence parallelism is on whenever TP is (it only saves memory and traffic).

Memory per rank (bytes): bf16 weights 2·P, fp32 gradients 4·P_trained (``grad_reduce_in_fp32``), and
ZeRO-1's fp32 main weights and Adam moments, 12 bytes per trained parameter over the data-parallel
group (dense parameters over DP·CP, experts over the expert-DP group), plus activations
(``plan_activations``). A layout fits when every rank's total stays under the GPU memory minus a
reserve (CUDA context, NCCL buffers, allocator slack).

Step time: the slowest pipeline stage's compute per micro-batch (FLOPs from ``qwen3vl.train.flops`` at
a fixed fraction of the GPU's peak, recompute counted as the extra forward it is) plus its exposed
communication, times (micro-batches + the pipeline bubble (pp - 1)/vpp), plus the data-parallel
traffic backward cannot hide. Communication is ring traffic at NVLink speed inside a node and at the
network's speed across nodes (ranks are placed tp-cp-ep-dp-pp, TP innermost). TP with SP moves 8
activations [T/cp, H] per layer (4 forward, 4 backward), CP gathers K/V forward and all-reduces their
gradient backward, EP moves the routed tokens four times per MoE layer. It ranks layouts; it does not
promise a wall-clock time.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

from qwen3vl.launch.plan_activations import Row, rank_activations
from qwen3vl.launch.plan_params import RankParams, RoleCounter
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.train.flops import FlopDims, peak_tflops, row_flops
from qwen3vl.train.config import ConfigError, RecomputeCfg
from qwen3vl.train.config_checks import validate
from qwen3vl.train.freeze import trainable_parts

GIB = 2 ** 30
IMAGE_SIDE = 32  # patches per side of a planned image (1,024 patches = 256 LLM tokens, a 512 px image)


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float  # what torch.cuda.get_device_properties reports
    nvlink_gb_s: float  # per GPU, one direction
    network_gb_s: float  # per GPU across nodes
    hbm_tb_s: float
    gpus_per_node: int = 8
    link_efficiency: float = 0.7  # ring collectives reach about this share of the link speed

    @property
    def peak_flops(self) -> float:
        return peak_tflops(self.name, "bf16") * 1e12


GPUS = {
    "h100": Hardware("H100", 79.6, 450.0, 50.0, 3.35),
    "h200": Hardware("H200", 139.8, 450.0, 50.0, 4.8),
    "b200": Hardware("B200", 178.4, 900.0, 50.0, 8.0),
}


@dataclass(frozen=True)
class Workload:
    """What one step processes, and the assumptions about its rows."""

    seq_length: int
    global_rows: int
    micro_batch_rows: int
    visual_fraction: float  # share of a row's tokens that are image/video tokens
    segment_length: int  # tokens per packed sample (attention cost grows with its square)
    recompute: RecomputeCfg = field(hash=False)  # train.recompute (a list inside: not hashed)
    trainable: tuple[str, ...]
    efficiency: float = 0.45  # achieved share of the bf16 peak on the GEMMs

    def row(self) -> Row:
        return Row(self.seq_length * self.micro_batch_rows, self.patches_per_row() * self.micro_batch_rows)

    def patches_per_row(self) -> int:
        images = int(self.visual_fraction * self.seq_length * 4) // IMAGE_SIDE ** 2
        return images * IMAGE_SIDE ** 2


@dataclass
class Memory:
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def as_json(self) -> dict[str, int]:
        return {"weights": int(self.weights), "grads": int(self.grads), "optimizer": int(self.optimizer),
                "activations": int(self.activations), "total": int(self.total)}


@dataclass
class Plan:
    layout: ParallelLayout  # with its pipeline split
    dp: int
    microbatches: int
    params: list[RankParams]  # per pipeline rank
    memory: list[Memory]  # per pipeline rank
    fits: bool
    step_time_s: float
    time_parts: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> int:
        """The pipeline rank with the largest memory."""
        return max(range(len(self.memory)), key=lambda r: self.memory[r].total)

    def as_json(self) -> dict:
        l = self.layout
        return {"tp": l.tp, "pp": l.pp, "cp": l.cp, "ep": l.ep, "etp": l.expert_tp, "dp": self.dp, "vpp": l.vpp,
                "pipeline_layers": list(l.pipeline_layers) if l.pipeline_layers else None,
                "parameters": max(p.total for p in self.params),
                "memory_bytes": self.memory[self.worst].as_json(), "fits": self.fits,
                "step_time_s": round(self.step_time_s, 4)}


# ---- candidates ----------------------------------------------------------------------------------

def balanced_split(num_layers: int, stages: int, first_min: int) -> Optional[tuple[int, ...]]:
    """Layers per (virtual) stage when they do not divide evenly: the extra layers go to the middle
    stages (the first holds the vision tower, the last the output layer), the first keeps at least
    ``first_min`` (DeepStack). None when the even split works; ValueError when no split does."""
    base, extra = divmod(num_layers, stages)
    if extra == 0 and base >= first_min:
        return None
    if num_layers < first_min + stages - 1:
        raise ValueError(f"{num_layers} layers cannot fill {stages} pipeline stages with {first_min} on the first")
    split = [base] * stages
    order = list(range(1, stages - 1)) + [stages - 1, 0]
    for i in range(extra):
        split[order[i % len(order)]] += 1
    while split[0] < first_min:
        donor = max(range(1, stages), key=lambda s: split[s])
        split[donor] -= 1
        split[0] += 1
    return tuple(split)


def candidate_layouts(model, world_size: int, gpus_per_node: int) -> Iterator[ParallelLayout]:
    """Layouts (with their pipeline split) worth validating for ``model`` on ``world_size`` GPUs: the
    degrees below, kept where ``ParallelLayout.problems`` (the one home of the layout rules) finds
    nothing wrong; the caller then validates the whole training config under each."""
    t = model.text
    tps = [x for x in (1, 2, 4, 8, 16) if x <= gpus_per_node]  # TP stays inside a node
    cps = [2 ** i for i in range(0, 8)]
    pps = sorted({1, 2, 4, 8, 16, 32} | {d for d in range(2, 33) if not t.num_layers % d})
    eps = [2 ** i for i in range(0, 9)] if t.is_moe else [1]
    dims = model.layout_dims()
    for tp, cp, pp in itertools.product(tps, cps, pps):
        if world_size % (tp * cp * pp):
            continue  # (the rules say so too; this only skips the inner loops early)
        for vpp in (None, 2, 4) if pp > 1 else (None,):
            if pp * (vpp or 1) > t.num_layers:
                continue  # stages with no layer only add bubble
            try:
                split = balanced_split(t.num_layers, pp * (vpp or 1), model.num_deepstack_layers)
            except ValueError:
                continue
            for ep in eps:
                for etp in ((None, 1) if t.is_moe and tp > 1 else (None,)):
                    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp,
                                            sequence_parallel=tp > 1, pipeline_layers=split)
                    if not layout.problems(world_size, **dims):
                        yield layout


def with_layout(cfg, layout: ParallelLayout):
    """A copy of the training config under another layout (``cfg.parallel.layout()`` gives it back)."""
    split = layout.pipeline_layers
    parallel = replace(cfg.parallel, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, ep=layout.ep,
                       etp=layout.etp, sequence_parallel=layout.sequence_parallel,
                       pipeline_layers=list(split) if split is not None else None)
    return replace(cfg, parallel=parallel, train=replace(cfg.train))


# ---- one layout ----------------------------------------------------------------------------------

def evaluate(model, layout: ParallelLayout, world_size: int, work: Workload, hw: Hardware, counter: RoleCounter, reserve_gib: float,
             params: Optional[list[RankParams]] = None) -> Plan:
    """Memory per pipeline rank and step time of one valid layout."""
    params = params or counter.roles(layout)
    dp = layout.dp(world_size)
    expert_dp = world_size // (layout.expert_tp * layout.ep * layout.pp)
    microbatches = work.global_rows // (dp * work.micro_batch_rows)
    stages = layout.stage_layers(model.text.num_layers)
    row = work.row()
    memory = []
    for rank, p in enumerate(params):
        acts = rank_activations(model, row, layout, work.recompute, stages, rank, microbatches,
                                frozenset(trainable_parts(list(work.trainable))))
        dense = p.trained - p.trained_expert
        memory.append(Memory(weights=2.0 * p.total, grads=4.0 * p.trained,
                             optimizer=12.0 * (dense / (dp * layout.cp) + p.trained_expert / expert_dp),
                             activations=acts.total))
    limit = (hw.memory_gib - reserve_gib) * GIB
    fits = all(m.total <= limit for m in memory)
    time, parts = step_time(model, layout, stages, params, dp, expert_dp, microbatches, work, hw)
    return Plan(layout, dp, microbatches, params, memory,
                fits, time, parts)


def _ring(bytes_: float, n: int, bandwidth_gb_s: float, hw: Hardware) -> float:
    """Seconds for a ring collective over n ranks that moves ``bytes_`` per rank."""
    if n <= 1:
        return 0.0
    return bytes_ * (n - 1) / n / (bandwidth_gb_s * 1e9 * hw.link_efficiency)


@functools.lru_cache(maxsize=16)
def _row_flops(dims: FlopDims, work: Workload) -> dict[str, float]:
    """FLOPs by part of one planned row (the same for every layout)."""
    segments = [work.segment_length] * (work.seq_length // work.segment_length)
    grids = [(1, IMAGE_SIDE, IMAGE_SIDE)] * (work.patches_per_row() // IMAGE_SIDE ** 2)
    return row_flops(dims, segments, grids, work.trainable).by_part


def step_time(model, layout: ParallelLayout, stages: list[int], params: list[RankParams], dp: int,
              expert_dp: int, microbatches: int, work: Workload, hw: Hardware) -> tuple[float, dict[str, float]]:
    t = model.text
    dims = FlopDims.from_model_config(model)
    count = _row_flops(dims, work)
    rows = work.micro_batch_rows
    r = work.recompute
    llm_factor = 4 / 3 if r.granularity == "full" else 1.0
    # Selective recompute redoes the forward (a third of forward + backward) of what it names.
    extra = count.get("llm_attention", 0.0) / 3 if r.redoes("core_attn") else 0.0
    layers = range(t.num_layers)
    mlp_share = (sum(dims.llm_layer_mlp_per_token(i) for i in layers if r.redoes("mlp", i in dims.moe_layers))
                 / sum(dims.llm_layer_linear_per_token(i) for i in layers))
    extra += count.get("llm", 0.0) * mlp_share / 3
    per_layer = (llm_factor * (count.get("llm", 0.0) + count.get("llm_attention", 0.0)) + extra) / t.num_layers
    vision = sum(count.get(k, 0.0) for k in ("vision", "vision_attention", "merger", "deepstack_merger"))
    vision *= 4 / 3 if r.vision else 1.0
    split = layout.tp * layout.cp
    nvlink, network = hw.nvlink_gb_s, hw.network_gb_s
    node = hw.gpus_per_node

    def link(span: int) -> float:
        return nvlink if span <= node else network

    local = work.seq_length * rows / layout.cp
    e = 2
    # 8 collectives of the whole [T/cp, H] per layer (all-gather/reduce-scatter pairs with SP; without
    # it 4 all-reduces move as much); full recompute repeats the forward's 4.
    tp_per_layer = (12 if r.granularity == "full" else 8) * _ring(local * t.hidden_size * e, layout.tp,
                                                                   link(layout.tp), hw)
    kv_bytes = work.seq_length * rows * 2 * t.num_key_value_heads * t.head_dim / layout.tp * e
    cp_per_layer = (4 if r.granularity == "full" else 3) * _ring(kv_bytes, layout.cp, link(layout.tp * layout.cp), hw)
    routed = t.num_experts_per_tok * local / layout.tp * layout.expert_tp * t.hidden_size * e
    ep_per_layer = 4 * _ring(routed, layout.ep, link(layout.expert_tp * layout.ep), hw)
    vpp = layout.vpp or 1
    slowest, parts = 0.0, {}
    for rank in range(layout.pp):
        compute = comm = 0.0
        for chunk in range(vpp):
            index = chunk * layout.pp + rank
            start = sum(stages[:index])
            for layer in range(start, start + stages[index]):
                compute += per_layer * rows / split
                comm += tp_per_layer + cp_per_layer + (ep_per_layer if t.is_moe_layer(layer) else 0.0)
            if index == 0:
                compute += vision * rows / split
            if index == len(stages) - 1:
                compute += count.get("lm_head", 0.0) * rows / split
        compute /= hw.peak_flops * work.efficiency
        if compute + comm > slowest:
            slowest, parts = compute + comm, {"compute": compute, "communication": comm}
    bubble = (layout.pp - 1) / vpp
    pipeline = slowest * (microbatches + bubble)
    # ZeRO-1: gradients reduce-scattered (fp32) during backward, parameters all-gathered (bf16) after.
    worst = max(params, key=lambda p: p.total)
    dense, expert = worst.trained - worst.trained_expert, worst.trained_expert
    data_span = layout.tp * layout.cp * dp
    reduce = _ring(4 * dense, dp * layout.cp, link(data_span), hw) + _ring(4 * expert, expert_dp, network, hw)
    gather = _ring(2 * dense, dp * layout.cp, link(data_span), hw) + _ring(2 * expert, expert_dp, network, hw)
    backward = pipeline * 2 / 3
    data = max(0.0, reduce - backward) + gather
    optimizer = 40 * (dense / (dp * layout.cp) + expert / expert_dp) / (hw.hbm_tb_s * 1e12)
    parts = {"compute": parts.get("compute", 0.0) * (microbatches + bubble),
             "communication": parts.get("communication", 0.0) * (microbatches + bubble),
             "bubble": slowest * bubble, "data_parallel": data, "optimizer": optimizer}
    return pipeline + data + optimizer, parts


def plan_all(cfg, model, world_size: int, work: Workload, hw: Hardware, reserve_gib: float,
             counter: RoleCounter) -> list[Plan]:
    """Every valid layout, fitting ones first, each group fastest first."""
    plans = []
    for layout in candidate_layouts(model, world_size, hw.gpus_per_node):
        try:
            validate(with_layout(cfg, layout), world_size, check_paths=False)
        except ConfigError:
            continue
        plans.append(evaluate(model, layout, world_size, work, hw, counter, reserve_gib))
    return sorted(plans, key=lambda p: (not p.fits, p.step_time_s))
