"""``qwen3vl-plan``: before any GPU hour, whether a stage fits on N GPUs and how to lay it out.

    qwen3vl-plan --model 235B-A22B --recipe stage3_256k --gpus 1024 --gpu h100
    qwen3vl-plan --model 8B --recipe stage1_mm --gpus 64 --layout tp=2,pp=1 --json
    qwen3vl-plan --model 2B --recipe stage1_mm --gpus 8 --layout recipe --measure

It composes the recipe as training would (``model=``, ``train.seq_length=``), enumerates the layouts
the training config accepts on N GPUs (or takes ``--layout``), counts each rank's parameters exactly
from the model built on the meta device under a fake process group (``plan_params``), adds ZeRO-1's
optimizer shards and the activation model (``plan_activations``), marks what fits the GPU, ranks by
estimated step time (``plan_layouts``) and explains the best fitting layout. ``--measure`` runs one
real CPU step of a small version of the model and prints the activation model against the bytes the
step saved. With ``--json`` the last line is one JSON object: {"layouts": [...best first],
"measured": {...} (with --measure)}. No GPU is used or needed. Exit status 1 when no layout fits (the
last line on stderr says what to change), 2 for a request that is not valid (a bad --layout, a GPU count
no layout divides).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace
from typing import Optional, Sequence

from qwen3vl.launch.plan_layouts import GPUS, Workload, balanced_split, evaluate, plan_all, with_layout
from qwen3vl.launch.plan_measure import measure
from qwen3vl.launch.plan_params import RoleCounter, build_roles, hide_gpus
from qwen3vl.launch.plan_report import explain, measurement, nothing_fits, table
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.train.config import ConfigError, compose_recipe, config_from_hydra
from qwen3vl.train.config_checks import build_model_config, validate

RESERVE_GIB = 6.0  # CUDA context, cuBLAS workspace, NCCL buffers, allocator slack


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3vl-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="a packaged recipe (stage0_align ...) or a YAML path")
    parser.add_argument("--model", help="model preset (2B, 4B, 8B, 32B, 30B-A3B, 235B-A22B, tiny, tiny-moe); "
                                        "default: the recipe's")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (the world size)")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--gpu", choices=("h100", "h200", "b200"), default="h100",
                        help="GPU kind: memory, peak FLOP/s, NVLink and network speed (default h100)")
    memory.add_argument("--gpu-memory-gib", type=float, help="GPU memory in GiB (H100 speeds otherwise)")
    parser.add_argument("--layout", help="evaluate one layout: tp=..,pp=..,vpp=..,cp=..,ep=..,etp=.. (omitted "
                                         "degrees are 1), or 'recipe' for the recipe's own")
    parser.add_argument("--seq-length", type=int, help="train.seq_length (default: the recipe's)")
    parser.add_argument("--visual-fraction", type=float, default=0.5,
                        help="share of a row's tokens that are image/video tokens (default 0.5)")
    parser.add_argument("--segment-length", type=int,
                        help="tokens per packed sample, for the attention cost (default: one sample per row)")
    parser.add_argument("--reserve-gib", type=float, default=RESERVE_GIB,
                        help=f"GPU memory kept free for CUDA, NCCL and allocator slack (default {RESERVE_GIB})")
    parser.add_argument("--top", type=int, default=8, help="layouts to print (default 8)")
    parser.add_argument("--measure", action="store_true",
                        help="run one real CPU step of a small version of the model: activation model vs "
                             "measured saved bytes")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object, last")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the recipe, as qwen3vl-launch takes them after --, e.g. "
                             "train.recompute.modules=[layernorm,mlp]")
    return parser


def parse_layout(text: str):
    degrees = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in ("tp", "pp", "vpp", "cp", "ep", "etp") or not value.strip().isdigit():
            raise SystemExit(f"qwen3vl-plan: --layout item {item!r}: use tp=N, pp=N, vpp=N, cp=N, ep=N or etp=N "
                             "separated by commas (or --layout recipe)")
        degrees[key] = int(value)
    tp = degrees.get("tp", 1)
    return ParallelLayout(tp=tp, pp=degrees.get("pp", 1), vpp=degrees.get("vpp"), cp=degrees.get("cp", 1),
                          ep=degrees.get("ep", 1), etp=degrees.get("etp"), sequence_parallel=tp > 1)


def _config(args):
    overrides = [f"model={args.model}"] if args.model else []
    if args.seq_length:
        overrides.append(f"train.seq_length={args.seq_length}")
    return config_from_hydra(compose_recipe(args.recipe, overrides + list(args.overrides)))


def _workload(cfg, args):
    t = cfg.train
    return Workload(seq_length=t.seq_length, global_rows=t.global_batch_tokens // t.seq_length,
                    micro_batch_rows=t.micro_batch_rows, visual_fraction=args.visual_fraction,
                    segment_length=min(args.segment_length or t.seq_length, t.seq_length),
                    recompute=cfg.train.recompute, trainable=tuple(cfg.train.trainable))


def _hardware(args):
    hw = GPUS[args.gpu]
    return replace(hw, memory_gib=args.gpu_memory_gib) if args.gpu_memory_gib else hw


def plan(args) -> tuple[list, object, object, object]:
    """(plans best first, model config, workload, hardware); exits 2 on a bad config or layout."""
    cfg = _config(args)
    model = build_model_config(cfg)
    work, hw = _workload(cfg, args), _hardware(args)
    counter = RoleCounter(model, list(cfg.train.trainable))
    if args.layout:
        layout = cfg.parallel.layout() if args.layout == "recipe" else parse_layout(args.layout)
        if layout.pipeline_layers is None:
            try:  # layers that do not divide evenly: the planner's balanced uneven split
                split = balanced_split(model.text.num_layers, layout.num_stages, model.num_deepstack_layers)
            except ValueError as err:
                raise SystemExit(f"qwen3vl-plan: --layout {args.layout}: {err}")
            layout = replace(layout, pipeline_layers=split)
        try:
            validate(with_layout(cfg, layout), args.gpus, check_paths=False)
        except ConfigError as err:
            raise SystemExit(f"qwen3vl-plan: this layout cannot run on {args.gpus} GPUs:\n{err}")
        plans = [evaluate(model, layout, args.gpus, work, hw, counter, args.reserve_gib)]
    else:
        plans = plan_all(cfg, model, args.gpus, work, hw, args.reserve_gib, counter)
        if not plans:
            raise SystemExit(f"qwen3vl-plan: no layout of {cfg.model.preset} is valid on {args.gpus} GPUs "
                             f"for this recipe (check the GPU count against the global batch of "
                             f"{work.global_rows} rows)")
    top = plans[0]
    built = build_roles(model, top.layout, args.gpus, list(cfg.train.trainable))
    if [(b.total, b.trained, b.trained_expert) for b in built] != \
            [(p.total, p.trained, p.trained_expert) for p in top.params]:
        raise RuntimeError(f"parameter counts of the built model {[b.total for b in built]} differ from the "
                           f"counted pieces {[p.total for p in top.params]}: a bug in qwen3vl.launch.plan_params")
    return plans, model, work, hw


def main(argv: Optional[Sequence[str]] = None) -> int:
    hide_gpus()
    # megatron warns at import that transformer-engine and apex are missing: true here and irrelevant
    # to a plan (it builds nothing on a GPU); the console keeps the plan only.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    args = build_parser().parse_args(argv)
    try:
        plans, model, work, hw = plan(args)
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise
    print(table(plans[:args.top], hw, args.reserve_gib))
    print()
    fits = any(p.fits for p in plans)
    if fits:
        print(explain(plans, model, work, hw, args.gpus, args.reserve_gib))
    measured = None
    if args.measure:
        result = measure(model, work.recompute, work.trainable)
        print()
        print(measurement(result))
        measured = {"activation_bytes": sum(result.measured.values()),
                    "predicted_activation_bytes": int(sum(result.predicted.values())),
                    "by_part": {k: {"measured": result.measured[k], "predicted": int(result.predicted[k])}
                                for k in result.measured}}
    if args.json:
        out = {"layouts": [p.as_json() for p in plans]}
        if measured is not None:
            out["measured"] = measured
        print(json.dumps(out))
    if not fits:  # the error, last: what the user has to change
        print(f"qwen3vl-plan: {nothing_fits(plans, model, work, hw, args.gpus, args.reserve_gib)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
