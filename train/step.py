"""One optimizer step through megatron-core's forward/backward schedules.

``get_forward_backward_func()`` picks the schedule from parallel_state: no pipelining (PP = 1), 1F1B
(PP > 1) or interleaved 1F1B (PP > 1 with virtual stages). Our part around it:

1. look ahead over the step's micro-batches and all-reduce the loss normaliser over dp_cp
   (``qwen3vl.train.loss``), so the per-token loss is exact for the whole global batch;
2. run the schedule with ``calculate_per_token_loss=True`` (megatron sums the gradients over dp_cp
   and divides them by the global token count in ``finalize_model_grads``);
3. reduce the logged losses, and if the loss is NaN or Inf anywhere, skip the update: zero the
   gradients, do not step the optimizer nor the scheduler, count it; every rank takes the same
   decision because the loss is reduced over every rank before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from qwen3vl.parallel.micro_batch import MicroBatch
from qwen3vl.train.loss import all_reduce_sum, make_loss_func, reduce_reports, step_normalizer

# run_model(model_chunk, micro_batch) -> the model's output: per-token loss [T_local] on the last
# pipeline stage, hidden states on the others.
RunModel = Callable[[torch.nn.Module, MicroBatch], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss: the run is diverging, not hitting a bad batch."""


@dataclass
class StepResult:
    losses: dict[str, float]  # 'lm loss' (the trained objective), 'token loss' (plain token mean)
    skipped: bool  # the loss was not finite: no update applied
    grad_norm: float | None
    num_zeros: int | None
    learning_rate: float | None


def _groups():
    return ps.get_data_parallel_group(with_context_parallel=True), ps.get_pipeline_model_parallel_group()


def train_step(
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    microbatches: Sequence[MicroBatch],
    run_model: RunModel,
    *,
    exponent: float,
) -> StepResult:
    """Forward, backward and (unless the loss is not finite) one optimizer update.

    ``microbatches``: this rank's micro-batches of the step (CP-local tensors on the model's device), all
    cut from rows of one length.
    """
    schedule_length(microbatches)  # before any collective: a bad step fails alike on every rank
    dp_cp_group, pp_group = _groups()
    normalizer = step_normalizer(
        [(mb.loss_mask(), mb.loss_token_counts) for mb in microbatches], exponent, group=dp_cp_group)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = run_model(model, mb)
        return output, make_loss_func(mb.loss_mask(), mb.loss_token_counts, exponent, normalizer.scale)

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(model_chunks, microbatches, forward_step, forward_only=False)
    losses = reduce_reports(reports, groups=(dp_cp_group, pp_group))
    # NaN also when the step had no loss token at all (0/0): nothing to learn from, no update either.
    if not all(math.isfinite(v) for v in losses.values()):
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        return StepResult(losses, skipped=True, grad_norm=None, num_zeros=None, learning_rate=current_lr(optimizer))
    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return StepResult(losses, skipped=not update_successful,
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      num_zeros=None if num_zeros is None else int(num_zeros),
                      learning_rate=current_lr(optimizer))


def run_schedule(model_chunks: Sequence[torch.nn.Module], microbatches: Sequence[MicroBatch],
                 forward_step: Callable, *, forward_only: bool, items: Sequence | None = None) -> list:
    """megatron's forward/backward schedule over this rank's micro-batches; its loss reports (the last
    pipeline stage's, an empty list elsewhere). The one call of the schedule: training (``forward_only=False``)
    and evaluation (``qwen3vl.train.evaluate``, forward only) run the same one.

    ``forward_step(data_iterator, model)`` draws from iterators over ``items``, one iterator per model chunk
    (virtual stage); by default the items are ``microbatches``. ``microbatches`` give the schedule its one
    length (``schedule_length``): evaluation passes (packed row, counted) pairs as items, one micro-batch
    per row length, and makes each item's micro-batch as its forward runs."""
    items = list(microbatches if items is None else items)
    # Every model chunk (virtual stage) walks the same micro-batches.
    iterators = [iter(list(items)) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=list(model_chunks),
        num_microbatches=len(items),
        seq_length=schedule_length(microbatches),
        micro_batch_size=1,
        forward_only=forward_only,
    )


def schedule_length(microbatches: Sequence[MicroBatch]) -> int:
    """The one ``seq_length`` of the schedule: every micro-batch must be cut from rows of one length."""
    lengths = {mb.schedule_seq_length for mb in microbatches}
    if len(lengths) != 1:
        raise ValueError(f"the micro-batches of one step have packed rows of lengths {sorted(lengths)}: the "
                         "pipeline schedules send tensors of one shape, so pack every row to train.seq_length")
    return lengths.pop()


def current_lr(optimizer) -> float | None:
    """The learning rate of the first group that follows the default schedule (else the first group)."""
    groups = list(optimizer.param_groups)
    if not groups:
        return None
    default = [g for g in groups if g.get("default_config")]
    return float((default or groups)[0]["lr"])


def global_counts(local: Sequence[float]) -> list[float]:
    """Sums per-DP-replica counts (samples, tokens) over the pure DP group: each replica once."""
    t = all_reduce_sum(torch.tensor(list(local), dtype=torch.float64), ps.get_data_parallel_group())
    return [float(x) for x in t]
