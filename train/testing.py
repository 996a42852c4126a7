"""Helpers for tests that train the tiny Qwen3-VL through the real app pieces on a fixed global batch.

Layout-parity, resume, freeze and NaN tests need the *same* global batch whatever the layout, which
the loader cannot give (its shard assignment depends on the DP size). So rows are drawn once with
the real loader (DP 1) in the test process and handed to every rank, which takes its DP slice of
each step: ``rows[step][dp_rank * M : (dp_rank + 1) * M]``. Everything else is the app's code:
``build_training`` (model, freeze, DDP + ZeRO-1, schedule), ``loop_hooks`` (CP slicing, the model
call) and ``run_training`` (the loop).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

# Every segment padded to a multiple of 4 serves CP 1 and CP 2 alike (CP 2 needs 2·CP).
PAD_MULTIPLE = 4


def tiny_config(run_dir: str, demo_dir: str, *, world_size: int, model: str = "tiny", recipe: str = "stage1_mm",
                seq_length: int = 256, rows_per_step: int = 2, steps: int = 5, overrides: Sequence[str] = ()):
    """A tiny CPU run of ``recipe`` on the demo corpus (validated for ``world_size`` ranks)."""
    from qwen3vl.train.config import load_config

    return load_config(recipe, [
        f"model={model}", "data=demo", f"run_dir={run_dir}", f"data.demo_dir={demo_dir}",
        f"train.seq_length={seq_length}", f"train.global_batch_tokens={seq_length * rows_per_step}",
        f"train.steps={steps}", "train.save_interval=100000",
        "parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "parallel.ep=1", "parallel.sequence_parallel=false", "schedule.warmup_steps=1", "wandb.mode=disabled",
        "train.recompute.granularity=null", *overrides], world_size=world_size)


def fixed_rows(cfg, steps: int, rows_per_step: int) -> list[list[Any]]:
    """``steps`` global batches of ``rows_per_step`` packed rows from the real loader (DP 1)."""
    from qwen3vl.data.loader import build_loader
    from qwen3vl.train.app import loader_config

    loader = build_loader(loader_config(cfg), seq_length=cfg.train.seq_length, pad_multiple=PAD_MULTIPLE,
                          dp_rank=0, dp_size=1, seed=cfg.train.seed)
    try:
        return [[next(loader) for _ in range(rows_per_step)] for _ in range(steps)]
    finally:
        loader.close()


@dataclass
class RowsRun:
    losses: list[float] = field(default_factory=list)
    token_losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def train_on_rows(
    cfg,
    rows: list[list[Any]],
    *,
    init_from: str | None = None,
    save_init_to: str | None = None,
    save_to: str | None = None,
    resume_from: str | None = None,
    wrap_run_model: Callable | None = None,
    inspect: Callable[[Any, str], Any] | None = None,
    metrics: bool = False,
) -> RowsRun:
    """Trains ``len(rows)`` steps on the given global batches under ``cfg``'s layout (collective).

    ``init_from``: weights to start from (any layout). ``save_init_to``: save the initial state as a
    checkpoint of a run directory there. ``save_to``: save the final state there. ``resume_from``: a
    full resume (model, optimizer, scheduler, counters) before training. ``wrap_run_model(run_model)``
    -> a replacement model call (tests inject NaN with it). ``inspect(setup, moment)`` is called with
    moment "before" and "after" training; its return values land in ``extra``. ``metrics``: write
    ``<run_dir>/metrics.jsonl`` like the app. ``extra["outcome"]``: "done" or "preempted".
    """
    from megatron.core import parallel_state as ps

    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.train.app import build_training, layout_of, loop_hooks
    from qwen3vl.train.checkpoint import TrainState, load_checkpoint, load_weights, save_checkpoint
    from qwen3vl.train.loop import LoopConfig, run_training

    initialize_parallel(layout_of(cfg), seed=cfg.train.seed)
    try:
        setup = build_training(cfg)
        state = TrainState()
        if init_from:
            load_weights(init_from, setup.model_chunks)
        if resume_from:
            state = load_checkpoint(resume_from, setup.model_chunks, setup.optimizer, setup.scheduler).state
        if save_init_to:
            save_checkpoint(save_init_to, state, setup.model_chunks, setup.optimizer, setup.scheduler)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        per_rank = len(rows[0]) // dp
        mine = iter([row for step in rows for row in step[dp_rank * per_rank:(dp_rank + 1) * per_rank]])
        run = RowsRun()
        hooks = loop_hooks(setup)
        if wrap_run_model is not None:
            hooks.run_model = wrap_run_model(hooks.run_model)

        def on_step(step: int, result) -> None:
            run.losses.append(result.losses["lm loss"])
            run.token_losses.append(result.losses["token loss"])
            run.grad_norms.append(result.grad_norm)
            run.skipped.append(result.skipped)

        hooks.on_step = on_step
        if inspect is not None:
            run.extra["before"] = inspect(setup, "before")
        loop = LoopConfig(steps=state.step + len(rows), num_microbatches=per_rank, exponent=cfg.train.loss_exponent,
                          max_consecutive_nan=cfg.train.max_consecutive_nan, save_at_end=False)
        writer = None
        if metrics:
            import torch.distributed as dist

            from qwen3vl.train.metrics import MetricsWriter

            writer = MetricsWriter(cfg.run_dir, total_steps=loop.steps, start_step=state.step,
                                   enabled=dist.get_rank() == 0, label="test")
        run.extra["outcome"] = run_training(cfg.run_dir, setup.model_chunks, setup.optimizer, setup.scheduler, mine,
                                            state, loop, hooks, writer)
        if writer is not None:
            writer.close(plot=False)
        if inspect is not None:
            run.extra["after"] = inspect(setup, "after")
        if save_to:
            save_checkpoint(save_to, state, setup.model_chunks, setup.optimizer, setup.scheduler)
        return run
    finally:
        destroy_parallel()


def named_parameters(setup) -> dict[str, torch.Tensor]:
    """This rank's parameters by name (DDP prefix removed), cloned."""
    from qwen3vl.train.checkpoint import unwrap

    out = {}
    for i, chunk in enumerate(setup.model_chunks):
        for name, p in unwrap(chunk).named_parameters():
            out[f"{i}.{name}"] = p.detach().clone()
    return out
