"""One tiny S0 stage that launcher and Slurm tests stop, resume and compare with an uninterrupted run.

``S0_STAGE`` is the demo's S0 at test size: a budget of 6 steps of 2 rows of 256 tokens, a warmup of 2
steps, then cosine decay. ``straight_trace`` runs it through once on 2 gloo ranks (one thread each);
runs that stop and resume (the same command with more steps, a preempted Slurm job) must end with its
losses, grad norms and lrs exactly (CPU fp32 with one thread per rank is deterministic).
"""
from __future__ import annotations

from pathlib import Path

S0_STEPS = 6
S0_STAGE = ("model=tiny", "data=demo", "train.seq_length=256", "train.global_batch_tokens=512",
            f"train.token_budget={S0_STEPS * 512}", "schedule.warmup_steps=2", "train.save_interval=100",
            "train.recompute.granularity=null", "parallel.cp=1")  # as the demo's stages (DP2 on 2 ranks)
TRACE_FIELDS = ("loss", "grad_norm", "lr")


def trace(records: list[dict]) -> dict[int, tuple]:
    """step -> (loss, grad norm, lr) of metrics.jsonl records."""
    return {r["step"]: tuple(r[k] for k in TRACE_FIELDS) for r in records}


def _straight_body(cfg) -> str:
    from qwen3vl.train.app import train

    return train(cfg)


def straight_trace(run_dir: Path, demo_dir: str) -> dict[int, tuple]:
    """Run the stage uninterrupted in ``run_dir``; its (loss, grad norm, lr) per step."""
    from qwen3vl_testing.distributed import run_distributed
    from qwen3vl.train.config import load_config
    from qwen3vl.train.metrics import read_metrics

    cfg = load_config("stage0_align", [*S0_STAGE, f"run_dir={run_dir}", f"data.demo_dir={demo_dir}",
                                       "wandb.mode=disabled"], world_size=2)
    assert run_distributed(_straight_body, world_size=2, timeout=300, cfg=cfg) == ["done"] * 2
    reference = trace(read_metrics(run_dir))
    assert sorted(reference) == list(range(1, S0_STEPS + 1))
    return reference
