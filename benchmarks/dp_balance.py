"""Per-rank step cost across data-parallel ranks, by arrival order and after the cost balance.

    python benchmarks/dp_balance.py --dp 8 --microbatches 4 --steps 100 [--model 8B] [--seq-length 8192]

The real loader of every one of ``--dp`` ranks runs on the standard mix of ``qwen3vl-data bench``
(captions, interleaved documents, text); each step takes ``--microbatches`` rows per rank. A row's
cost is its model FLOPs (``qwen3vl.train.balance.row_cost``: LLM tokens, attention Σ s², ViT Σ patches²
per frame group) for the recipe's model; a rank's cost is the sum of its rows. Printed: max/mean of
the per-rank costs per step, averaged and worst over the steps, as the rows arrive and after
``plan_assignment``, and how many rows moved. A pure data-side measurement: packing decides rows from
sample lengths and patch counts only, so the pixels are not decoded here (image headers give the
sizes), which makes a 100-step DP8 run take minutes on one core instead of hours.
Not a test: results and machine go in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from qwen3vl.data import encode
from qwen3vl.data.bench import write_bench_corpus
from qwen3vl.data.image_processing import image_grid
from qwen3vl.data.loader import LoaderConfig, build_loader
from qwen3vl.train.balance import plan_assignment, row_cost
from qwen3vl.train.config import load_config
from qwen3vl.train.config_checks import build_model_config
from qwen3vl.train.flops import FlopDims


class _SizedOnly:
    """An image known by its size: the patches are counted, never decoded (see the module docstring)."""

    def __init__(self, grid):
        self.grid = grid
        self.num_patches = grid[0] * grid[1] * grid[2]

    def write(self, out) -> None:
        pass


def _skip_pixel_decoding() -> None:
    encode.load_rgb = lambda image, where: image
    encode.image_frames = lambda image, lo, hi, patch, merge, tp: _SizedOnly(
        image_grid(image.height, image.width, lo, hi, patch, merge))


def imbalance(costs: list[list[float]]) -> float:
    loads = np.array([sum(c) for c in costs])
    return float(loads.max() / loads.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=4, help="rows per rank and step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--model", default="8B")
    p.add_argument("--samples", type=int, default=800, help="samples in the generated corpus (cycled)")
    args = p.parse_args(argv)

    _skip_pixel_decoding()
    cfg = load_config("stage1_mm", [f"model={args.model}", "data=demo"], world_size=2)
    dims = FlopDims.from_model_config(build_model_config(cfg))
    before, after, moved = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_bench_corpus(Path(tmp), samples=args.samples)
        loader_cfg = LoaderConfig(datasets=[(pattern, 1.0)], shuffle_buffer=100)
        loaders = [build_loader(loader_cfg, args.seq_length, pad_multiple=2, dp_rank=r, dp_size=args.dp, seed=0)
                   for r in range(args.dp)]
        for _ in range(args.steps):
            costs = [[row_cost(dims, next(loader)) for _ in range(args.microbatches)] for loader in loaders]
            plan = plan_assignment(costs)
            before.append(imbalance(costs))
            after.append(imbalance([[costs[src][i] for src, i in rows] for rows in plan]))
            moved += sum(src != dst for dst, rows in enumerate(plan) for src, _ in rows)
    result = {"dp": args.dp, "microbatches": args.microbatches, "steps": args.steps, "model": args.model,
              "seq_length": args.seq_length,
              "arrival_max_over_mean": {"mean": round(float(np.mean(before)), 4), "worst": round(max(before), 4)},
              "balanced_max_over_mean": {"mean": round(float(np.mean(after)), 4), "worst": round(max(after), 4)},
              "rows_moved_per_step": round(moved / args.steps, 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
