"""The golden loss trace: 10 steps of the tiny model's S1 on the demo corpus (fp32, CPU, 2 ranks).

It runs the public command (``qwen3vl-launch --nproc 2 --recipe stage1_mm -- model=tiny data=demo``) with
the recipe's tensor-parallel layout (TP2 with sequence parallelism; CP1, as 2 ranks hold no more) and its own schedule (the horizon comes from the
token budget: 10 steps of 4 rows of 512 tokens), and compares every step's loss, token loss, grad norm
and learning rate with ``golden/tiny_stage1_demo.json``: the step and learning rate exactly, the rest
within four float32 roundings (``ROUNDING``). fp32 CPU kernels sum in an order that depends on the
instruction set: an AMD EPYC with AVX2 and no AVX-512 differs from the file (written on another CPU) by at
most 4.5e-9 on the losses and 1.1e-7 (one float32 rounding) on the grad norms, while one step moves
the loss by 2e-5 to 8e-3 relative. Parity tests compare layouts with each other and ours with
transformers within one commit; this one catches a change that moves every layout alike (data order, loss
weighting, initialisation, schedule, kernel choice).

A change that is meant to move the numbers regenerates the file and says why in its commit message:

    QWEN3VL_REGEN_GOLDEN=1 python -m pytest tests/train/test_golden_trace.py
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from qwen3vl.launch import launcher
from qwen3vl.train.metrics import read_metrics

GOLDEN = Path(__file__).parent / "golden" / "tiny_stage1_demo.json"
STEPS, ROWS, SEQ = 10, 4, 512
FIELDS = ("loss", "token_loss", "grad_norm", "lr")
ROUNDING = 4 * 2.0 ** -23  # four float32 unit roundings, relative


def test_tiny_stage1_matches_the_golden_trace(tmp_path, demo_dir):
    run_dir = tmp_path / "s1"
    code = launcher.main([
        "--nproc", "2", "--recipe", "stage1_mm", "--",
        "model=tiny", "data=demo", "parallel.cp=1", f"run_dir={run_dir}", f"data.demo_dir={demo_dir}",
        f"train.seq_length={SEQ}", f"train.global_batch_tokens={SEQ * ROWS}",
        f"train.token_budget={SEQ * ROWS * STEPS}", "train.precision=fp32",
        "data.num_workers=0", "wandb.mode=disabled"])
    assert code == 0
    trace = [{k: r[k] for k in ("step", *FIELDS)} for r in read_metrics(run_dir)]
    assert [r["step"] for r in trace] == list(range(1, STEPS + 1))
    if os.environ.get("QWEN3VL_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(trace, indent=1) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    for ours, theirs in zip(trace, golden, strict=True):
        same = (ours["step"] == theirs["step"] and ours["lr"] == theirs["lr"]
                and all(math.isclose(ours[k], theirs[k], rel_tol=ROUNDING, abs_tol=0.0) for k in FIELDS[:3]))
        assert same, f"step {theirs['step']}: {ours} != golden {theirs}"
