"""The training loop: steps, counters, metrics, NaN policy, checkpoints and preemption.

Model-agnostic: the caller gives the wrapped model chunks, optimizer, scheduler, a loader of packed
rows, how a row becomes a micro-batch for this rank (``to_microbatch``: CP slicing, device) and how the
model is called (``run_model``). ``qwen3vl.train.app`` wires it to Qwen3-VL; tests also drive it with
small models.

Per step: draw the step's micro-batches, ``train_step`` (look-ahead loss normaliser, megatron
schedule, update or NaN skip), count samples and tokens over DP, log a metrics line (rank 0), then
save every ``save_interval`` steps, at the end, and when a preemption signal arrived (after which
the loop returns ``"preempted"`` and the process exits 0). ``max_consecutive_nan`` skipped steps in
a row stop the run with ``NonFiniteLossError``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from qwen3vl.train.checkpoint import TrainState, save_checkpoint
from qwen3vl.train.signals import PreemptionHandler
from qwen3vl.train.step import NonFiniteLossError, RunModel, StepResult, global_counts, train_step

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    steps: int  # the step to stop after (global step count, not steps of this process)
    num_microbatches: int  # per DP rank and step
    exponent: float = 0.5
    save_interval: int = 0  # 0: only at the end (and on preemption)
    keep_last_k: int | None = None
    max_consecutive_nan: int = 5
    save_at_end: bool = True


@dataclass
class LoopHooks:
    """What the loop needs from the outside world besides the model."""

    to_microbatch: Callable[[Any], dict[str, Any]]  # a loader item -> this rank's micro-batch dict
    run_model: RunModel
    count: Callable[[Any], tuple[int, int]] = lambda item: (1, 0)  # item -> (samples, real tokens)
    flops: Callable[[Any], float] | None = None  # item -> model FLOPs of it (whole row, fwd+bwd)
    loader_state: Callable[[], Any] = lambda: None
    skipped_counts: Callable[[], dict[str, int]] = dict  # data samples skipped, by reason
    config_yaml: str | None = None
    on_step: Callable[[int, StepResult], None] | None = None  # tests: observe each step


def run_training(
    run_dir: str,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    loader: Iterator[Any],
    state: TrainState,
    cfg: LoopConfig,
    hooks: LoopHooks,
    metrics=None,
) -> str:
    """Trains from ``state.step`` to ``cfg.steps``. Returns "done" or "preempted". Collective."""
    last_saved = state.step

    def save() -> None:
        nonlocal last_saved
        save_checkpoint(run_dir, state, model_chunks, optimizer, scheduler, loader_state=hooks.loader_state(),
                        config_yaml=hooks.config_yaml, keep_last_k=cfg.keep_last_k)
        last_saved = state.step

    with PreemptionHandler() as preemption:
        while state.step < cfg.steps:
            started = time.perf_counter()
            items = [next(loader) for _ in range(cfg.num_microbatches)]
            microbatches = [hooks.to_microbatch(item) for item in items]
            result = train_step(model_chunks, optimizer, scheduler, microbatches, hooks.run_model,
                                exponent=cfg.exponent, seq_length=int(microbatches[0]["input_ids"].numel()))
            samples, tokens, flops = global_counts([
                sum(hooks.count(i)[0] for i in items), sum(hooks.count(i)[1] for i in items),
                sum(hooks.flops(i) for i in items) if hooks.flops else 0.0])
            state.step += 1
            state.consumed_samples += int(samples)
            state.consumed_tokens += int(tokens)
            _apply_nan_policy(state, result, cfg.max_consecutive_nan)
            if metrics is not None:
                metrics.log(state.step, loss=result.losses["lm loss"], lr=result.learning_rate or 0.0,
                            grad_norm=result.grad_norm if result.grad_norm is not None else float("nan"),
                            tokens=int(tokens), step_time_s=time.perf_counter() - started,
                            model_flops=flops if hooks.flops else None,
                            skipped={"nan_loss_steps": state.skipped_steps, **hooks.skipped_counts()},
                            token_loss=result.losses["token loss"], update_skipped=result.skipped)
            if hooks.on_step is not None:
                hooks.on_step(state.step, result)
            if preemption.should_stop():
                save()
                return "preempted"
            if cfg.save_interval and state.step % cfg.save_interval == 0:
                save()
    if cfg.save_at_end and last_saved != state.step:
        save()
    return "done"


def _apply_nan_policy(state: TrainState, result: StepResult, max_consecutive_nan: int) -> None:
    if not result.skipped:
        state.consecutive_nan = 0
        return
    state.skipped_steps += 1
    state.consecutive_nan += 1
    log.warning("step %d: non-finite loss %s, update skipped (%d in a row, %d in total)", state.step,
                result.losses, state.consecutive_nan, state.skipped_steps)
    if state.consecutive_nan >= max_consecutive_nan:
        raise NonFiniteLossError(
            f"{state.consecutive_nan} consecutive steps had a NaN/Inf loss (last: step {state.step}, "
            f"{result.losses}); the run is diverging. Resume from the last checkpoint with a lower learning "
            f"rate or check the data, or raise train.max_consecutive_nan")
