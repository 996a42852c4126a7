"""A NaN/Inf loss skips the update on every rank, is reported in metrics, and the run goes on.

Run X meets a NaN on one rank at step 2 of batches (a, b, c); run Y trains (a, c). A skipped update
leaves model, Adam state and schedule untouched, so X's step 3 must equal Y's step 2 exactly, and the
final weights too.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from qwen3vl_testing.distributed import DistributedTestError, run_distributed
from qwen3vl_testing.training import fixed_rows, named_parameters, tiny_config, train_on_rows


def nan_at(steps: set[int] | None):
    def wrap(run_model):
        import torch.distributed as dist

        calls = {"n": 0}

        def run(model, mb):
            calls["n"] += 1
            out = run_model(model, mb)
            if dist.get_rank() == 1 and (steps is None or calls["n"] in steps):
                out = out * float("nan")
            return out

        return run

    return wrap


def nan_body(cfg, rows, nan_steps):
    run = train_on_rows(cfg, rows, wrap_run_model=nan_at(set(nan_steps)) if nan_steps else None,
                        inspect=lambda setup, moment: named_parameters(setup) if moment == "after" else None,
                        metrics=True)
    return run.losses, run.skipped, run.extra["after"]


def test_a_nan_step_is_skipped_and_training_goes_on(demo_dir, tmp_path):
    cfg_x = tiny_config(str(tmp_path / "x"), demo_dir, world_size=2, steps=3)
    cfg_y = tiny_config(str(tmp_path / "y"), demo_dir, world_size=2, steps=2, horizon=3)  # x's schedule
    a, b, c = fixed_rows(cfg_x, 3, 2)
    x = run_distributed(nan_body, world_size=2, timeout=300, cfg=cfg_x, rows=[a, b, c], nan_steps=[2])
    y = run_distributed(nan_body, world_size=2, timeout=300, cfg=cfg_y, rows=[a, c], nan_steps=[])
    for (x_losses, x_skipped, x_params), (y_losses, _, y_params) in zip(x, y):
        assert x_skipped == [False, True, False]
        assert math.isnan(x_losses[1])
        assert [x_losses[0], x_losses[2]] == y_losses
        assert all(torch.equal(x_params[n], y_params[n]) for n in y_params)
    records = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update_skipped"] for r in records] == [False, True, False]
    assert records[1]["loss"] is None and records[1]["skipped"]["nan_loss_steps"] == 1
    assert records[2]["skipped"]["nan_loss_steps"] == 1


def test_too_many_consecutive_nan_steps_stop_the_run(demo_dir, tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), demo_dir, world_size=2, steps=3, overrides=["train.max_consecutive_nan=2"])
    rows = fixed_rows(cfg, 3, 2)
    with pytest.raises(DistributedTestError, match="2 consecutive steps had a NaN/Inf loss"):
        run_distributed(nan_body, world_size=2, timeout=300, cfg=cfg, rows=rows, nan_steps=[1, 2, 3])
