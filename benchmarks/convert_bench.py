"""Time and peak memory of both conversions for 2B-shaped checkpoints of several depths.

    python benchmarks/convert_bench.py --layers 4 16 --workdir /tmp/convert_bench [--workers 1]

For each depth it writes a random Hugging Face checkpoint of the 2B preset with that many LLM layers
(bf16, the release's format; written by our streaming safetensors writer, names and shapes from
transformers' meta model, values random normal: conversion cost does not depend on them), then runs
``qwen3vl-convert hf-to-mcore`` and ``qwen3vl-convert mcore-to-hf`` as child processes and reports each
one's wall time, CPU time (user + system: what other load on a shared machine barely changes) and peak
resident memory (the child's ``ru_maxrss``). What matters is the growth with
depth: memory that follows the number of layers means something holds the model. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from qwen3vl.model.interop.hf_checkpoint import expected_hf_shapes, write_hf_checkpoint
from qwen3vl.model.interop.hf_config import config_to_hf
from qwen3vl.model.presets import get_preset


def random_hf_checkpoint(directory: Path, layers: int) -> int:
    """A random bf16 2B-shaped checkpoint with ``layers`` LLM layers; returns its bytes."""
    preset = get_preset("2B")
    config = replace(preset, name=f"2B-{layers}l", text=replace(preset.text, num_layers=layers))
    hf_config = dict(config_to_hf(config, style="v5"), dtype="bfloat16")
    shapes = expected_hf_shapes(hf_config)
    generator = torch.Generator().manual_seed(layers)

    def make(names):
        return [torch.randn(shapes[n], generator=generator).mul_(0.02).to(torch.bfloat16) for n in names]

    write_hf_checkpoint(directory, hf_config, [[n] for n in sorted(shapes)], make, torch.bfloat16)
    return sum(torch.Size(s).numel() * 2 for s in shapes.values())


def run_measured(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    err = child.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{err[-3000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    convert = [sys.executable, "-m", "qwen3vl.launch.convert"]
    rows = []
    for layers in args.layers:
        root = args.workdir / f"2b-{layers}l"
        shutil.rmtree(root, ignore_errors=True)
        hf, ckpt, back = root / "hf", root / "mcore", root / "back"
        nbytes = random_hf_checkpoint(hf, layers)
        workers = ["--workers", str(args.workers)]
        to_mcore = run_measured(convert + ["hf-to-mcore", "--hf", str(hf), "--out", str(ckpt)] + workers)
        to_hf = run_measured(convert + ["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)] + workers)
        rows.append(dict(layers=layers, checkpoint_bytes=nbytes,
                         **{f"{name}_{what}": round(value, 1) if what != "peak_rss" else value
                            for name, run in (("hf_to_mcore", to_mcore), ("mcore_to_hf", to_hf))
                            for what, value in zip(("wall_s", "cpu_s", "peak_rss"), run)}))
        print(f"{layers:>3} layers  {nbytes / 1e9:5.2f} GB   hf-to-mcore {to_mcore[0]:6.1f} s wall {to_mcore[1]:6.1f} s "
              f"CPU {to_mcore[2] / 1e9:5.2f} GB   mcore-to-hf {to_hf[0]:6.1f} s wall {to_hf[1]:6.1f} s CPU "
              f"{to_hf[2] / 1e9:5.2f} GB", flush=True)
        if not args.keep:
            shutil.rmtree(root)
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "workers": args.workers, "rows": rows}))


if __name__ == "__main__":
    main()
