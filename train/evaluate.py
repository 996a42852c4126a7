"""Held-out loss during training: forward only, under the run's layout, the same rows every time.

``Evaluator(eval_sets, model_chunks, to_microbatch, run_model, exponent=..., microbatch_multiple=...)``
is called by the loop with the step (``LoopHooks.evaluate``). For each held-out set
(``qwen3vl.data.eval_set.EvalSet``: one pass in a fixed order, whatever the layout) it deals the pass's
rows out to the data-parallel ranks (row ``i`` to DP rank ``i mod dp``), runs megatron's schedule forward
only (``qwen3vl.train.step.run_schedule``, the one training uses: pipelined under PP, CP-sliced, TP/EP as
configured) in eval mode without autograd, and reduces the loss reports of ``qwen3vl.train.loss`` over
dp_cp and pp, exactly like a training step's. Per set it returns:

* ``loss_token_mean``: the plain mean over every loss token of the pass (perplexity = exp of it);
* ``loss_sqrt``: the training objective, each token weighted n_i^-α by its sample's loss tokens
  (α = train.loss_exponent, 0.5: the square-root rule) and normalised over the whole pass;
* ``tokens``: the loss tokens of the pass.

Both are sums over tokens, so the result does not depend on how the rows fall on ranks, on the micro-batch
order or on the row packing. Every DP rank runs the same number of micro-batches (the schedule and expert
parallelism's all-to-all need every rank of a step to take part): ranks with fewer rows run copies of
row 0 with no loss token. MoE auxiliary losses are not part of either value (the reports hold the LM loss
only; the router adds its aux loss in training mode alone).

Nothing of training changes: the model goes back to training mode, the RNG states (torch, CUDA, megatron's
tracker) are restored, no gradient is made, and the training loader is not read.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from qwen3vl.train.loss import make_loss_func, report_sums
from qwen3vl.train.step import RunModel, run_schedule


@dataclass(frozen=True)
class EvalResult:
    dataset: str
    loss_token_mean: float
    loss_sqrt: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss_token_mean) if self.loss_token_mean < 700 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}


class Evaluator:
    def __init__(self, eval_sets: Sequence[Any], model_chunks: Sequence[torch.nn.Module],
                 to_microbatch: Callable[[Any], Any], run_model: RunModel, *, exponent: float,
                 microbatch_multiple: int = 1, report: Callable[[int, list[EvalResult]], Any] | None = None) -> None:
        """``report(step, results)``: where the results go (the metrics writer's ``eval``), on every rank."""
        self.eval_sets, self.model_chunks = list(eval_sets), list(model_chunks)
        self.to_microbatch, self.run_model, self.exponent = to_microbatch, run_model, exponent
        self.microbatch_multiple, self.report = microbatch_multiple, report

    def __call__(self, step: int) -> list[EvalResult]:
        """Evaluate every held-out set with the current weights. Collective."""
        with _evaluation_mode(self.model_chunks):
            results = [self.evaluate(s) for s in self.eval_sets]
        if self.report is not None:
            self.report(step, results)
        return results

    def evaluate(self, eval_set) -> EvalResult:
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # Row 0 is kept by every rank: the shape of the micro-batches that only fill the schedule.
        total, kept = eval_set.rows(keep=lambda i: i % dp == dp_rank or i == 0)
        if total == 0:
            raise RuntimeError(f"held-out set {eval_set.name!r} gave no packed row: its shards hold no readable "
                               "sample (check eval.datasets, or raise eval.samples / eval.tokens)")
        mine = [row for i, row in kept if i % dp == dp_rank]
        per_rank = -(-total // dp)
        per_rank = -(-per_rank // self.microbatch_multiple) * self.microbatch_multiple
        items = [(row, True) for row in mine] + [(kept[0][1], False)] * (per_rank - len(mine))

        def forward_step(data_iterator: Iterator, model):
            row, counted = next(data_iterator)
            # Made here, not up front: a rank's whole share of a held-out pass, every row with its pixels,
            # would otherwise sit on the device at once.
            mb = self.to_microbatch(row)
            mask = mb.loss_mask() if counted else torch.zeros_like(mb.loss_mask())
            # The normaliser's scale only matters for gradients: there are none here.
            return self.run_model(model, mb), make_loss_func(mask, mb.loss_token_counts, self.exponent, 1.0)

        # The schedule's one length: a micro-batch per distinct row length is all its check needs.
        by_length = {row.seq_length: row for row, _ in items}
        reports = run_schedule(self.model_chunks, [self.to_microbatch(r) for r in by_length.values()], forward_step,
                               forward_only=True, items=items)
        groups = (ps.get_data_parallel_group(with_context_parallel=True), ps.get_pipeline_model_parallel_group())
        (sqrt_num, sqrt_den), (token_num, token_den) = report_sums(reports, groups).tolist()
        return EvalResult(eval_set.name, loss_token_mean=_ratio(token_num, token_den),
                          loss_sqrt=_ratio(sqrt_num, sqrt_den), tokens=int(token_den))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


@contextmanager
def _evaluation_mode(model_chunks: Sequence[torch.nn.Module]):
    """Eval mode and no autograd for the duration; the training mode and every RNG state restored after."""
    was_training = [chunk.training for chunk in model_chunks]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracked = tracker.get_states() if hasattr(tracker, "get_states") else None
    try:
        for chunk in model_chunks:
            chunk.eval()
        with torch.no_grad():
            yield
    finally:
        for chunk, training in zip(model_chunks, was_training):
            chunk.train(training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if tracked is not None:
            tracker.set_states(tracked)
