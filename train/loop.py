"""The training loop: steps, counters, metrics, NaN policy, checkpoints and preemption.

Model-agnostic: the caller gives the wrapped model chunks, optimizer, scheduler, a loader of packed
rows, how a row becomes a micro-batch for this rank (``to_microbatch``: CP slicing, device) and how the
model is called (``run_model``). ``qwen3vl.train.app`` wires it to Qwen3-VL; tests also drive it with
small models.

Per step: draw the step's micro-batches (a failure on any rank stops all, qwen3vl.train.draw),
``train_step`` (look-ahead loss normaliser, megatron schedule, update or NaN skip), count samples,
tokens and skipped data over DP, log a metrics line (rank 0) with the time the step waited for
its batch and the peak memory (both the largest over the ranks), evaluate the held-out sets every
``eval_interval`` steps (also before the first step of a stage and after the last, see ``LoopConfig``),
then save every ``save_interval`` steps and at the end. Where the loop stops: ``steps`` (train.steps or the end of the schedule),
``stop_at_step``, or earlier with a checkpoint when a preemption signal arrived (``"preempted"``)
or the wall-time limit is near (``"time_limit"``); the process then exits 0 and the same command
continues. ``max_consecutive_nan`` skipped steps in a row stop the run with ``NonFiniteLossError``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from qwen3vl.data.robust import skip_counts, skip_vector
from qwen3vl.parallel.micro_batch import MicroBatch
from qwen3vl.train.checkpoint import TrainState, save_checkpoint
from qwen3vl.train.checkpoint_async import AsyncSaver
from qwen3vl.train.draw import draw_microbatches
from qwen3vl.train.flops import peak_memory_bytes
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
    stop_at_step: Optional[int] = None  # also stop after this step
    # Wall-time limit in seconds after ``started_at`` (a ``clock`` time): save and stop while there is
    # still time for the next step and the save.
    stop_after_s: Optional[float] = None
    started_at: float = 0.0

    @property
    def last_step(self) -> int:
        return min(self.steps, self.stop_at_step) if self.stop_at_step is not None else self.steps
    async_save: bool = False  # write checkpoints in the background; committed once written (checkpoint_async)
    # Held-out evaluation (LoopHooks.evaluate): after every eval_interval-th step (0: never), before the
    # first step of a stage (step 0 only: a resume has evaluated its start already), and after step
    # eval_end_step (the end of the stage's schedule; None: no final evaluation) unless just evaluated.
    # Only steps count, never where an invocation stops, so a resumed run evaluates where a straight one does.
    eval_interval: int = 0
    eval_at_start: bool = False
    eval_end_step: Optional[int] = None


@dataclass
class LoopHooks:
    """What the loop needs from the outside world besides the model."""

    to_microbatch: Callable[[Any], MicroBatch]  # a loader item -> this rank's micro-batch
    run_model: RunModel
    count: Callable[[Any], tuple[int, int]] = lambda item: (1, 0)  # item -> (samples, real tokens)
    flops: Callable[[Any], float] | None = None  # item -> model FLOPs of it (whole row, fwd+bwd)
    loader_state: Callable[[], Any] = lambda: None
    skipped_counts: Callable[[], dict[str, int]] = dict  # data samples skipped, by reason
    config_yaml: str | None = None
    checkpoint_files: dict[str, str] | None = None  # more text files for every checkpoint (the schedule plan)
    on_step: Callable[[int, StepResult], None] | None = None  # tests: observe each step
    clock: Callable[[], float] = time.time  # wall time for stop_after_s (tests pass a fake one)
    balance: Callable[[list], list] | None = None  # this rank's items of a step -> after the cost balance over DP
    trace: Callable[[int, Sequence[Any]], None] | None = None  # (step, items trained on): the data trace
    evaluate: Callable[[int], Any] | None = None  # (step): held-out loss, logged (qwen3vl.train.evaluate)


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
    run_info: dict[str, Any] | None = None,
) -> str:
    """Trains from ``state.step`` to ``cfg.last_step``. Returns "done", "preempted" or "time_limit". Collective.

    ``run_info`` (e.g. the backend and device) goes into the first metrics line this run writes."""
    last_saved = state.step
    first_line = dict(run_info or {})
    timing = _Timing()
    # The saver is closed (its last save committed) on the way out of a normal return only: after an
    # exception a save still in flight never commits and the next run removes it, which is safer than
    # a collective wait on ranks that may be gone.
    saver = AsyncSaver() if cfg.async_save else None

    def save() -> None:
        nonlocal last_saved
        started = time.perf_counter()
        save_checkpoint(run_dir, state, model_chunks, optimizer, scheduler, loader_state=hooks.loader_state(),
                        config_yaml=hooks.config_yaml, keep_last_k=cfg.keep_last_k,
                        extra_files=hooks.checkpoint_files, async_saver=saver)
        timing.saves.append(time.perf_counter() - started)
        last_saved = state.step

    evaluated = -1  # the step last evaluated by this invocation

    def evaluate() -> None:
        nonlocal evaluated
        started = time.perf_counter()
        hooks.evaluate(state.step)
        timing.evals.append(time.perf_counter() - started)
        evaluated = state.step

    if hooks.evaluate is not None and cfg.eval_at_start and state.step == 0:
        evaluate()
    with PreemptionHandler() as preemption:
        while state.step < cfg.last_step:
            started = time.perf_counter()
            items = draw_microbatches(loader, cfg.num_microbatches)  # a data failure stops every rank
            data_wait = time.perf_counter() - started  # the balance below is communication, not data
            if hooks.balance is not None:
                items = hooks.balance(items)
            microbatches = [hooks.to_microbatch(item) for item in items]
            result = train_step(model_chunks, optimizer, scheduler, microbatches, hooks.run_model,
                                exponent=cfg.exponent)
            # The data skips ride along in the counts' reduction: metrics show every DP rank's, not rank 0's.
            samples, tokens, flops, *skips = global_counts([
                sum(hooks.count(i)[0] for i in items), sum(hooks.count(i)[1] for i in items),
                sum(hooks.flops(i) for i in items) if hooks.flops else 0.0, *skip_vector(hooks.skipped_counts())])
            memory, data_wait = _max_over_ranks([peak_memory_bytes(), data_wait])
            state.step += 1
            state.consumed_samples += int(samples)
            state.consumed_tokens += int(tokens)
            _apply_nan_policy(state, result, cfg.max_consecutive_nan)
            step_time = time.perf_counter() - started
            timing.steps.append(step_time)
            if metrics is not None:
                metrics.log(state.step, loss=result.losses["lm loss"], lr=result.learning_rate or 0.0,
                            grad_norm=result.grad_norm if result.grad_norm is not None else float("nan"),
                            tokens=int(tokens), step_time_s=step_time,
                            model_flops=flops if hooks.flops else None,
                            skipped={"nan_loss_steps": state.skipped_steps, **skip_counts(skips)},
                            token_loss=result.losses["token loss"], update_skipped=result.skipped,
                            peak_memory_bytes=int(memory), data_wait_s=data_wait, **first_line)
                first_line = {}
            if hooks.trace is not None:
                hooks.trace(state.step, items)
            if hooks.on_step is not None:
                hooks.on_step(state.step, result)
            # Before a stop or a save: the checkpoint of a step comes after its evaluation, so a resume
            # never misses one.
            if hooks.evaluate is not None and cfg.eval_interval and state.step % cfg.eval_interval == 0:
                evaluate()
            if saver is not None:
                saver.poll()  # commits a background save once every rank has written it
            time_up = cfg.stop_after_s is not None and state.step < cfg.last_step and \
                hooks.clock() + timing.reserve(cfg.stop_after_s) > cfg.started_at + cfg.stop_after_s
            stop = preemption.agree(time_up)
            if stop is not None:
                save()
                if saver is not None:
                    saver.close()
                if stop == "time_limit":
                    log.warning("step %d: train.stop_after_minutes is near (%.1f s reserved for the next step and "
                                "the save): checkpointed; run the same command to continue", state.step,
                                timing.reserve(cfg.stop_after_s))
                return stop
            if cfg.save_interval and state.step % cfg.save_interval == 0:
                save()
    if hooks.evaluate is not None and cfg.eval_end_step == state.step and evaluated != state.step:
        evaluate()
    if cfg.save_at_end and last_saved != state.step:
        save()
    if saver is not None:
        saver.close()
    return "done"


class _Timing:
    """Step and save durations, for the time the wall-time limit keeps in reserve."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.saves: list[float] = []
        self.evals: list[float] = []

    def reserve(self, limit_s: float) -> float:
        """Two of the longest steps, the longest evaluation and the longest save so far; before any save, a
        tenth of the limit (at most 5 minutes), since saving costs far more than a step on large models."""
        save = max(self.saves) if self.saves else min(300.0, 0.1 * limit_s)
        return 2 * max(self.steps, default=0.0) + max(self.evals, default=0.0) + save


def _max_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise MAX over every rank (one small collective per step)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(x) for x in t.cpu()]


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
