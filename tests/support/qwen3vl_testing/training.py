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
                seq_length: int = 256, rows_per_step: int = 2, steps: int | None = 5, horizon: int | None = None,
                warmup: int = 1, overrides: Sequence[str] = ()):
    """A tiny CPU run of ``recipe`` on the demo corpus (validated for ``world_size`` ranks).

    The stage's token budget is ``horizon`` steps (default: ``steps``), so the schedule warms up for
    ``warmup`` steps and decays over the rest; ``steps`` is where the run stops (None: the end of the budget)."""
    from qwen3vl.train.config import load_config

    budget = seq_length * rows_per_step * (horizon if horizon is not None else steps)
    return load_config(recipe, [
        f"model={model}", "data=demo", f"run_dir={run_dir}", f"data.demo_dir={demo_dir}",
        f"train.seq_length={seq_length}", f"train.global_batch_tokens={seq_length * rows_per_step}",
        f"train.token_budget={budget}", *([f"train.steps={steps}"] if steps is not None else []),
        "train.save_interval=100000",
        "parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "parallel.ep=1", "parallel.sequence_parallel=false", f"schedule.warmup_steps={warmup}", "wandb.mode=disabled",
        "train.recompute.granularity=null",
        # The demo's held-out evaluation only where a test asks for it (eval.datasets=[...]): it costs time.
        "eval.datasets=[]", "eval.interval=0", *overrides], world_size=world_size)


# Overrides that turn on the demo's held-out evaluation in a tiny_config (off there by default).
EVAL_DEMO_HELDOUT = ("eval.datasets=[{name: heldout, shards: demo}]", "eval.samples=null")


def evaluate_weights(cfg, init: str | None = None, save_init_to: str | None = None) -> list[dict]:
    """The held-out results of ``cfg``'s layout, with the weights of ``init`` (or fresh ones, saved to
    ``save_init_to``)."""
    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.train.app import build_evaluator, build_training, loop_hooks
    from qwen3vl.train.checkpoint import TrainState, load_weights, save_checkpoint

    initialize_parallel(cfg.parallel.layout(), seed=cfg.train.seed)
    try:
        setup = build_training(cfg)
        if init:
            load_weights(init, setup.model_chunks)
        if save_init_to:
            save_checkpoint(save_init_to, TrainState(), setup.model_chunks, setup.optimizer, setup.scheduler)
        evaluator = build_evaluator(setup, loop_hooks(setup))
        return [r.as_dict() for r in evaluator(0)]
    finally:
        destroy_parallel()


def fixed_rows(cfg, steps: int, rows_per_step: int) -> list[list[Any]]:
    """``steps`` global batches of ``rows_per_step`` packed rows from the real loader (DP 1)."""
    from qwen3vl.data.loader import build_loader

    loader = build_loader(cfg.data.loader_config(), seq_length=cfg.train.seq_length, pad_multiple=PAD_MULTIPLE,
                          dp_rank=0, dp_size=1, seed=cfg.train.seed)
    try:
        return [[next(loader) for _ in range(rows_per_step)] for _ in range(steps)]
    finally:
        loader.close()


def alternating_rows(model: str, steps: int, rows_per_step: int, seq_length: int, pad_multiple: int,
                     seed: int = 0) -> list[list[Any]]:
    """``steps`` global batches of packed rows that alternate between media and text only.

    Row r of step s carries media when s + r is even and only text otherwise, so on every DP rank (rows
    are dealt out in contiguous blocks) the last micro-batch of a step changes between media and
    text-only from one step to the next: the case in which a parameter that gets no gradient breaks
    megatron's overlapped gradient reduction. On odd steps the media is one image, so under context
    parallelism one CP rank has no media of its own to encode. Each row is ``seq_length`` tokens, every
    segment padded to ``pad_multiple``.
    """
    from qwen3vl.model.presets import get_preset
    from qwen3vl_testing.model_cases import SampleBuilder, pack_samples

    config = get_preset(model)
    rows = []
    for step in range(steps):
        batch = []
        for row in range(rows_per_step):
            def sample(k: int) -> SampleBuilder:
                return SampleBuilder(config, seed=seed + 1000 * step + 10 * row + k)

            if (step + row) % 2 == 0 and step % 2:
                samples = [sample(0).text(5).image(4, 6).text(9).build(), sample(1).text(13).build()]
            elif (step + row) % 2 == 0:
                samples = [sample(0).text(5).image(4, 4).text(9).build(),
                           sample(1).text(3).video(2, 2, 4).text(6).image(2, 4).text(2).build(),
                           sample(2).text(11).build()]
            else:
                samples = [sample(0).text(23).build(), sample(1).text(17).build(), sample(2).text(30).build()]
            used = sum(-(-s.input_ids.numel() // pad_multiple) * pad_multiple for s in samples)
            assert used <= seq_length, f"the samples take {used} > {seq_length} rows"
            batch.append(pack_samples(samples, pad_multiple=pad_multiple, tail=seq_length - used))
        rows.append(batch)
    return rows


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
    clock: Callable[[], float] | None = None,
    loop_overrides: dict[str, Any] | None = None,
) -> RowsRun:
    """Trains ``len(rows)`` steps on the given global batches under ``cfg``'s layout (collective).

    ``init_from``: weights to start from (any layout). ``save_init_to``: save the initial state as a
    checkpoint of a run directory there. ``save_to``: save the final state there. ``resume_from``: a
    full resume (model, optimizer, scheduler, counters) before training. ``wrap_run_model(run_model)``
    -> a replacement model call (tests inject NaN with it). ``inspect(setup, moment)`` is called with
    moment "before" and "after" training; its return values land in ``extra``. ``metrics``: write
    ``<run_dir>/metrics.jsonl`` like the app. ``clock``, ``loop_overrides``: the loop's wall clock and more
    ``LoopConfig`` fields (e.g. a time limit). ``extra["outcome"]``: "done", "preempted" or "time_limit".
    """
    from megatron.core import parallel_state as ps

    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.train.app import build_training, loop_hooks
    from qwen3vl.train.checkpoint import TrainState, load_checkpoint, load_weights, save_checkpoint
    from qwen3vl.train.loop import LoopConfig, run_training

    initialize_parallel(cfg.parallel.layout(), seed=cfg.train.seed)
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
        if clock is not None:
            hooks.clock = clock
        if inspect is not None:
            run.extra["before"] = inspect(setup, "before")
        loop = LoopConfig(steps=state.step + len(rows), num_microbatches=per_rank, exponent=cfg.train.loss_exponent,
                          max_consecutive_nan=cfg.train.max_consecutive_nan, save_at_end=False,
                          **(loop_overrides or {}))
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
        run.extra["rows_moved"] = getattr(hooks.balance, "moved", 0)  # by the cost balance across DP ranks
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
