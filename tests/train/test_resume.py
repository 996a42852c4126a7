"""Exact resume and preemption through the real app (``qwen3vl.train.app.train``) on 2 gloo ranks.

2K steps straight must equal K steps, stop, resume, K more: the same per-step losses (bitwise: CPU fp32
is deterministic) and the same final weights and optimizer state — which needs the model, the
distributed optimizer, the schedule, every rank's RNG, the loader position of each DP rank and the
counters to be restored. A preemption signal on one rank makes every rank save and stop.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from qwen3vl.parallel.testing import run_distributed
from qwen3vl.train import checkpoint as ckpt
from qwen3vl.train.testing import fixed_rows, tiny_config, train_on_rows

K = 2


def app_body(cfg) -> str:
    from qwen3vl.train.app import train

    return train(cfg)


def compare_checkpoints_body(a: str, b: str) -> list[str]:
    """Names of the saved tensors (model and optimizer) that differ between two checkpoints."""
    import torch
    from megatron.core import dist_checkpointing

    def flat(tree, prefix=""):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
        if items is None:
            return {prefix.rstrip("."): tree}
        return {k: v for key, sub in items for k, v in flat(sub, f"{prefix}{key}.").items()}

    ta, tb = flat(dist_checkpointing.load_plain_tensors(a)), flat(dist_checkpointing.load_plain_tensors(b))
    assert set(ta) == set(tb) and any(k.startswith("optimizer") for k in ta), sorted(ta)[:5]
    same = {k: torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k] for k in ta}
    return [k for k, equal in same.items() if not equal]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_is_exact(demo_dir, tmp_path):
    def config(name: str, steps: int):
        return tiny_config(str(tmp_path / name), demo_dir, world_size=2, steps=steps,
                           overrides=[f"train.save_interval={K}", "data.shuffle_buffer=16"])

    assert run_distributed(app_body, world_size=2, timeout=300, cfg=config("straight", 2 * K)) == ["done"] * 2
    assert run_distributed(app_body, world_size=2, timeout=300, cfg=config("resumed", K)) == ["done"] * 2
    assert ckpt.find_latest(tmp_path / "resumed") == ckpt.iteration_dir(tmp_path / "resumed", K)
    assert run_distributed(app_body, world_size=2, timeout=300, cfg=config("resumed", 2 * K)) == ["done"] * 2

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 2 * K + 1))  # the metrics file has each step once
    assert resumed == straight
    different = run_distributed(compare_checkpoints_body, world_size=1, timeout=120,
                                a=str(ckpt.iteration_dir(tmp_path / "straight", 2 * K)),
                                b=str(ckpt.iteration_dir(tmp_path / "resumed", 2 * K)))[0]
    assert different == []


def preempting(run_model):
    """Rank 1 receives SIGUSR1 during step 2 (as from Slurm before a preemption)."""
    import torch.distributed as dist

    calls = {"n": 0}

    def run(model, mb):
        calls["n"] += 1
        if calls["n"] == 2 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return run_model(model, mb)

    return run


def preempt_body(cfg, rows) -> tuple[str, int]:
    run = train_on_rows(cfg, rows, wrap_run_model=preempting)
    return run.extra["outcome"], len(run.losses)


def test_a_preemption_signal_on_one_rank_saves_and_stops_every_rank(demo_dir, tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), demo_dir, world_size=2, steps=4)
    rows = fixed_rows(cfg, 4, 2)
    assert run_distributed(preempt_body, world_size=2, timeout=300, cfg=cfg, rows=rows) == [("preempted", 2)] * 2
    assert ckpt.find_latest(tmp_path / "run") == ckpt.iteration_dir(tmp_path / "run", 2)
