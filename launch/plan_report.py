"""What ``qwen3vl-plan`` prints: the ranked table, the paragraph on the best fitting layout, and the
activation model next to a measurement."""
from __future__ import annotations

from qwen3vl.launch.plan_layouts import GIB, Hardware, Plan, Workload


def name(plan: Plan) -> str:
    l = plan.layout
    parts = [f"TP{l.tp}" + ("+SP" if l.sequence_parallel else "")]
    if l.cp > 1:
        parts.append(f"CP{l.cp}")
    if l.pp > 1:
        parts.append(f"PP{l.pp}" + (f"×VPP{l.vpp}" if l.vpp else ""))
    if l.ep > 1:
        parts.append(f"EP{l.ep}" + (f"/ETP{l.etp}" if l.etp is not None else ""))
    parts.append(f"DP{plan.dp}")
    return " ".join(parts)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def table(plans: list[Plan], hw: Hardware, reserve_gib: float) -> str:
    lines = [f"{'layout':<34}{'params/rank':>12}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'total':>8}"
             f"{'fits':>6}{'step s':>9}   (GiB on the fullest rank; {hw.memory_gib:.1f} GiB "
             f"{hw.name}, {reserve_gib:g} reserved)"]
    for p in plans:
        m = p.memory[p.worst]
        lines.append(f"{name(p):<34}{max(q.total for q in p.params) / 1e9:>11.2f}B{_gib(m.weights):>9}"
                     f"{_gib(m.grads):>8}{_gib(m.optimizer):>8}{_gib(m.activations):>8}{_gib(m.total):>8}"
                     f"{'yes' if p.fits else 'no':>6}{p.step_time_s:>9.2f}")
    return "\n".join(lines)


def explain(plans: list[Plan], model, work: Workload, hw: Hardware, gpus: int, reserve_gib: float) -> str:
    """One paragraph on the best fitting layout (or on why nothing fits)."""
    fitting = [p for p in plans if p.fits]
    limit = hw.memory_gib - reserve_gib
    if not fitting:
        return nothing_fits(plans, model, work, hw, gpus, reserve_gib)
    best = fitting[0]
    l, t = best.layout, model.text
    rank = best.worst
    m = best.memory[rank]
    sentences = [f"Best fitting layout for {model.name} at {work.seq_length:,} tokens per row on {gpus} "
                 f"{hw.name}s: {name(best)}, about {best.step_time_s:.1f} s per step of {work.global_rows} rows "
                 f"({best.microbatches} micro-batches per DP rank)."]
    if l.tp > 1:
        sentences.append(f"TP{l.tp} with sequence parallelism splits every layer's weights and activations "
                         f"{l.tp} ways while its 8 activation collectives per layer stay on NVLink inside "
                         f"a {hw.gpus_per_node}-GPU node.")
    if l.cp > 1:
        sentences.append(f"CP{l.cp} cuts each row to {work.seq_length // l.cp:,} tokens per rank (two mirrored "
                         f"chunks of every sequence), which is what keeps the activations at "
                         f"{_gib(m.activations)} GiB.")
    if l.pp > 1:
        split = l.stage_layers(t.num_layers)
        bubble = (l.pp - 1) / (l.vpp or 1) / (best.microbatches + (l.pp - 1) / (l.vpp or 1))
        sentences.append(f"PP{l.pp}{f' interleaved {l.vpp} ways' if l.vpp else ''} holds "
                         f"{'/'.join(map(str, split))} LLM layers per (virtual) stage (the ViT sits on the "
                         f"first); the pipeline bubble costs about {bubble:.0%} of the step.")
    if l.ep > 1:
        sentences.append(f"EP{l.ep} leaves {t.num_experts // l.ep} of the {t.num_experts} experts on each "
                         f"rank{' (not tensor-split: ETP1)' if l.etp == 1 else ''}, so the expert weights, "
                         f"which are most of the model, shrink {l.ep} ways.")
    sentences.append(f"The fullest rank (pipeline rank {rank}) needs {_gib(m.total)} of {limit:.0f} usable GiB: "
                     f"{_gib(m.weights)} bf16 weights, {_gib(m.grads)} fp32 gradients, {_gib(m.optimizer)} "
                     f"optimizer state (ZeRO-1 over {best.dp * l.cp} ranks), {_gib(m.activations)} activations.")
    others = [p for p in fitting[1:]]
    faster = [p for p in plans if not p.fits and p.step_time_s < best.step_time_s]
    comparison = f"It is the fastest of {len(fitting)} fitting layouts ({len(plans)} valid)"
    if others:
        comparison += (f"; the next, {name(others[0])}, is {others[0].step_time_s / best.step_time_s - 1:.1%} "
                       f"slower")
    if faster:
        comparison += (f"; {name(faster[0])} would be {1 - faster[0].step_time_s / best.step_time_s:.0%} faster "
                       f"but needs {_gib(faster[0].memory[faster[0].worst].total)} GiB")
    sentences.append(comparison + ".")
    return " ".join(sentences)


def nothing_fits(plans: list[Plan], model, work: Workload, hw: Hardware, gpus: int, reserve_gib: float) -> str:
    """Why no layout fits, and what to change (qwen3vl-plan's error when none does)."""
    least = min(plans, key=lambda p: p.memory[p.worst].total)
    m = least.memory[least.worst]
    limit = hw.memory_gib - reserve_gib
    states = m.weights + m.grads + m.optimizer
    fixes = [f"use more GPUs (the leanest layout's weights, gradients and optimizer state alone take "
             f"{_gib(states)} GiB per rank)" if states > 0.5 * limit * GIB else "use more GPUs"]
    if work.recompute.granularity != "full" or not work.recompute.vision:
        fixes.append("full recompute (train.recompute.granularity=full train.recompute.vision=true)")
    fixes += ["a shorter --seq-length", "GPUs with more memory (--gpu h200|b200)"]
    what = f"the {len(plans)} valid layouts" if len(plans) > 1 else "this layout"
    return (f"Nothing fits: of {what} of {model.name} at {work.seq_length:,} tokens per row on {gpus} {hw.name}s "
            f"({limit:.0f} GiB usable each), the leanest, {name(least)}, still needs {_gib(m.total)} GiB on its "
            f"fullest rank ({_gib(m.activations)} of them activations). Fix: " + ", or ".join(fixes) + ".")


def measurement(result) -> str:
    lines = [f"activations of one CPU step (bf16, {result.seq_length} tokens, {result.patches} patches, one rank), "
             f"saved for backward:",
             f"{'part':<10}{'predicted MiB':>15}{'measured MiB':>15}{'error':>9}"]
    for part in result.measured:
        pred, meas = result.predicted[part], result.measured[part]
        error = f"{pred / meas - 1:+.1%}" if meas else "-"
        lines.append(f"{part:<10}{pred / 2**20:>15.1f}{meas / 2**20:>15.1f}{error:>9}")
    total_p, total_m = sum(result.predicted.values()), sum(result.measured.values())
    lines.append(f"{'total':<10}{total_p / 2**20:>15.1f}{total_m / 2**20:>15.1f}{total_p / total_m - 1:>+9.1%}")
    return "\n".join(lines)
