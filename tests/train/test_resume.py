"""Exact resume and preemption through the real app (``qwen3vl.train.app.train``) on 2 gloo ranks.

2K steps straight must equal K steps (``train.stop_at_step``), stop, resume, K more: the same per-step
losses, grad norms and lrs (bitwise: CPU fp32 is deterministic) and the same final weights and optimizer
state — which needs the model, the distributed optimizer, the schedule (fixed by the stage's budget, with a
real warmup and decay), every rank's RNG, the loader position of each DP rank and the counters to be
restored. A resume that would change the schedule is refused unless replanned. A preemption signal on one
rank makes every rank save and stop. The resumed run writes its checkpoints asynchronously, so the
same equality also holds for background saves.

The stopped and resumed invocations also evaluate the demo's held-out split (before the first step and
after every step) while the straight run does not: so equal training numbers also say that evaluating
changes nothing of training, and the evaluations (each step once, across the resume) must equal those of
the straight run's checkpoints evaluated afterwards.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from qwen3vl_testing.distributed import run_distributed
from qwen3vl.train import checkpoint as ckpt
from qwen3vl.train.config import ConfigError
from qwen3vl.train.metrics import read_events, read_metrics
from qwen3vl_testing.training import EVAL_DEMO_HELDOUT, evaluate_weights, fixed_rows, tiny_config, train_on_rows

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


def records(run_dir: Path) -> dict[int, dict]:
    """step -> its loss, grad norm and lr, from metrics.jsonl."""
    return {r["step"]: {k: r[k] for k in ("loss", "grad_norm", "lr")} for r in read_metrics(run_dir)}


def test_resume_is_exact(demo_dir, tmp_path):
    def config(name: str, *overrides: str):
        # One stage of 2K steps (warmup 2, then cosine decay), whatever the invocation stops at.
        evaluation = [*EVAL_DEMO_HELDOUT, "eval.interval=1"] if name == "resumed" else []
        return tiny_config(str(tmp_path / name), demo_dir, world_size=2, steps=None, horizon=2 * K, warmup=2,
                           overrides=[f"train.save_interval={K}", "data.shuffle_buffer=16",
                                      f"train.async_save={name == 'resumed'}", *evaluation, *overrides])

    assert run_distributed(app_body, world_size=2, timeout=300, cfg=config("straight")) == ["done"] * 2
    stopped = config("resumed", f"train.stop_at_step={K}")
    assert run_distributed(app_body, world_size=2, timeout=300, cfg=stopped) == ["done"] * 2
    assert ckpt.find_latest(tmp_path / "resumed") == ckpt.iteration_dir(tmp_path / "resumed", K)
    assert run_distributed(app_body, world_size=2, timeout=300, cfg=config("resumed")) == ["done"] * 2

    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 2 * K + 1))  # the metrics file has each step once
    assert resumed == straight
    lrs = [straight[step]["lr"] for step in sorted(straight)]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > lrs[3] > 0  # warmup, then decay
    different = run_distributed(compare_checkpoints_body, world_size=1, timeout=120,
                                a=str(ckpt.iteration_dir(tmp_path / "straight", 2 * K)),
                                b=str(ckpt.iteration_dir(tmp_path / "resumed", 2 * K)))[0]
    assert different == []

    evaluations = [e for e in read_events(tmp_path / "resumed") if e["event"] == "eval"]
    assert [(e["step"], e["dataset"]) for e in evaluations] == [(s, "heldout") for s in range(2 * K + 1)]
    assert not [e for e in read_events(tmp_path / "straight") if e["event"] == "eval"]
    fields = ("loss_token_mean", "loss_sqrt", "tokens")
    for step in (K, 2 * K):  # one from before the stop, one from after the resume
        [expected] = run_distributed(evaluate_weights, world_size=2, timeout=300, cfg=config("resumed"),
                                     init=str(ckpt.iteration_dir(tmp_path / "straight", step)))[0]
        assert {k: evaluations[step][k] for k in fields} == {k: expected[k] for k in fields}, step


def test_a_changed_schedule_is_refused_on_resume_unless_replanned(demo_dir, tmp_path):
    def config(*overrides: str, horizon: int = 2):
        return tiny_config(str(tmp_path / "run"), demo_dir, world_size=2, steps=None, horizon=horizon,
                           overrides=["train.save_interval=1", *overrides])

    assert run_distributed(app_body, world_size=2, timeout=300, cfg=config()) == ["done"] * 2
    with pytest.raises(ConfigError) as refused:
        config("optim.lr.llm=3e-4", "schedule.decay_style=linear", horizon=3)
    message = str(refused.value)
    assert "resumes from iter_0000002, whose schedule this config would change" in message
    assert "schedule.total_steps (or train.token_budget / train.global_batch_tokens): saved 2, new 3" in message
    assert "schedule.decay_style: saved cosine, new linear" in message
    assert "'llm': 5e-05" in message and "'llm': 0.0003" in message and "schedule.on_resume=replan" in message
    replanned = config("schedule.on_resume=replan", "schedule.decay_style=linear", horizon=3)
    assert run_distributed(app_body, world_size=2, timeout=300, cfg=replanned) == ["done"] * 2
    events = read_events(tmp_path / "run")
    assert [(e["event"], e["step"]) for e in events] == [("schedule_replanned", 2)]
    assert (events[0]["saved"]["total_steps"], events[0]["new"]["total_steps"]) == (2, 3)
    assert (events[0]["saved"]["decay_style"], events[0]["new"]["decay_style"]) == ("cosine", "linear")
    assert sorted(records(tmp_path / "run")) == [1, 2, 3]


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


def fake_clock(seconds_per_call: float):
    """A wall clock that advances ``seconds_per_call`` each time it is read (the loop reads it once a step)."""
    ticks = {"n": 0}

    def clock() -> float:
        ticks["n"] += 1
        return seconds_per_call * ticks["n"]

    return clock


def stop_body(cfg, rows, stop: str) -> tuple[str, int]:
    """``stop``: "signal" (rank 1 gets SIGUSR1 during step 2) or "time_limit" (a wall-time limit of 1000 s
    while each step takes 300 s on a fake clock). Returns the outcome and the steps trained."""
    if stop == "signal":
        run = train_on_rows(cfg, rows, wrap_run_model=preempting)
    else:
        run = train_on_rows(cfg, rows, clock=fake_clock(300.0), loop_overrides=dict(stop_after_s=1000.0, started_at=0.0))
    return run.extra["outcome"], len(run.losses)


def _stopped_run(demo_dir: str, run_dir: Path, steps: int, stop: str) -> list[tuple[str, int]]:
    cfg = tiny_config(str(run_dir), demo_dir, world_size=2, steps=steps)
    return run_distributed(stop_body, world_size=2, timeout=300, cfg=cfg, rows=fixed_rows(cfg, steps, 2), stop=stop)


def test_a_preemption_signal_on_one_rank_saves_and_stops_every_rank(demo_dir, tmp_path):
    assert _stopped_run(demo_dir, tmp_path / "run", 4, "signal") == [("preempted", 2)] * 2
    assert ckpt.find_latest(tmp_path / "run") == ckpt.iteration_dir(tmp_path / "run", 2)


def test_a_wall_time_limit_checkpoints_before_it_is_reached(demo_dir, tmp_path):
    # After step 3 the clock says 900 s: the next step and the save (100 s reserved before any save was
    # timed) would not fit in the limit, so the run saves and stops there.
    assert _stopped_run(demo_dir, tmp_path / "run", 5, "time_limit") == [("time_limit", 3)] * 2
    assert ckpt.find_latest(tmp_path / "run") == ckpt.iteration_dir(tmp_path / "run", 3)
