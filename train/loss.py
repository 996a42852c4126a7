"""The square-root-normalised token loss, exact under any split of the global batch.

Sample ``i`` with ``n_i`` loss tokens gives each of its tokens the weight ``n_i^-α``; the loss of one
optimizer step is normalised over the *whole* global batch (every DP rank, micro-batch, pack and CP
rank)::

    L_α = Σ_t n_{s(t)}^-α · l_t / Σ_t n_{s(t)}^-α  =  Σ_i n_i^(1-α) · mean_i / Σ_i n_i^(1-α)

α = 0.5 is Qwen3-VL's square-root normalisation, α = 0 the token mean, α = 1 the sample mean.

How it meets megatron's per-token path (Option A of docs loss_packing_cp.md §A.4): megatron sums
``loss`` over micro-batches, sums the gradients over the dp_cp group and divides them by the global
integer token count N. So before the step's first forward we look ahead over all its micro-batches,
all-reduce the token-local sums (N, S = Σ_t n^-α) over dp_cp, and give every token the pre-scaled
weight ``ŵ_t = (N / S) · n^-α``. Then ``Σ ŵ l / N = L_α`` exactly, and the divisor stays a real token
count, so MoE aux losses (scaled by routed tokens) keep their coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist


def token_weights(loss_token_counts: torch.Tensor, exponent: float) -> torch.Tensor:
    """Unscaled per-token weights ``n^-α`` in float64 (n^-α on bf16 would lose precision).

    A position whose sample has no loss token (padding, n = 0) gets weight 0.
    """
    n = loss_token_counts.to(torch.float64)
    positive = n > 0
    return torch.where(positive, n.clamp(min=1.0).pow(-exponent), torch.zeros_like(n))


def local_weight_sums(loss_mask: torch.Tensor, loss_token_counts: torch.Tensor, exponent: float) -> torch.Tensor:
    """float64 ``[count, Σ n^-α]`` over this rank's supervised tokens of one micro-batch.

    Token-local sums, so summing them over the dp_cp group counts each token exactly once however
    samples are cut across CP ranks (a per-sample sum over dp_cp would count a sample C times).
    """
    mask = loss_mask.to(torch.float64)
    return torch.stack([mask.sum(), (mask * token_weights(loss_token_counts, exponent)).sum()])


@dataclass(frozen=True)
class StepNormalizer:
    """The global sums of one optimizer step: N supervised tokens, S = Σ_t n^-α over them."""

    num_tokens: float
    weight_sum: float

    @property
    def scale(self) -> float:
        """N / S: the factor that turns megatron's division by N into a division by S."""
        return self.num_tokens / self.weight_sum if self.weight_sum > 0 else 0.0


def step_normalizer(
    microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    exponent: float,
    group: dist.ProcessGroup | None = None,
) -> StepNormalizer:
    """Sums ``(loss_mask, loss_token_counts)`` pairs of every local micro-batch and all-reduces over
    ``group`` (the dp_cp group in training; None: no reduction, one process holds the whole batch)."""
    sums = torch.zeros(2, dtype=torch.float64)
    for loss_mask, counts in microbatches:
        sums += local_weight_sums(loss_mask.cpu(), counts.cpu(), exponent)
    if group is not None:
        sums = all_reduce_sum(sums, group)
    return StepNormalizer(num_tokens=float(sums[0]), weight_sum=float(sums[1]))


def weighted_loss(
    per_token_loss: torch.Tensor,
    *,
    loss_mask: torch.Tensor,
    loss_token_counts: torch.Tensor,
    exponent: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The loss function megatron's schedules call with ``calculate_per_token_loss=True``.

    Returns ``(Σ ŵ·l, int local token count, report)``. The count must be an int tensor: the schedules
    accumulate it into an int32 total and finalize divides the gradients by its dp_cp sum.
    The report holds ``[numerator, denominator]`` pairs to be summed over micro-batches and dp_cp:
    'lm loss' is L_α, 'token loss' the plain token mean (comparable with α = 0 baselines).
    """
    per_token_loss = per_token_loss.reshape(-1)
    mask = loss_mask.reshape(-1).to(per_token_loss.device).bool()
    w = token_weights(loss_token_counts.reshape(-1).to(per_token_loss.device), exponent) * mask.to(torch.float64)
    # Masked positions may carry garbage (e.g. a huge CE on a pad); select instead of multiplying
    # so that a non-finite value there cannot leak into the sum.
    l = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    loss_sum = (l * (w * scale).to(l.dtype)).sum()
    num_tokens = mask.sum().to(torch.int)
    l64 = l.detach().to(torch.float64)
    report = {
        "lm loss": torch.stack([(w * l64).sum(), w.sum()]),
        "token loss": torch.stack([l64.sum(), mask.sum().to(torch.float64)]),
    }
    return loss_sum, num_tokens, report


def make_loss_func(
    loss_mask: torch.Tensor, loss_token_counts: torch.Tensor, exponent: float, scale: float
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Binds one micro-batch's mask, counts and the step's N/S: the second value a megatron
    ``forward_step_func`` returns."""

    def loss_func(per_token_loss: torch.Tensor):
        return weighted_loss(
            per_token_loss, loss_mask=loss_mask, loss_token_counts=loss_token_counts, exponent=exponent, scale=scale
        )

    return loss_func


REPORT_KEYS = ("lm loss", "token loss")


def reduce_reports(
    reports: Sequence[dict[str, torch.Tensor]], groups: Sequence[dist.ProcessGroup | None] = ()
) -> dict[str, float]:
    """Sums the ``[num, den]`` pairs over micro-batches, then over each of ``groups`` in turn; returns
    ``num / den`` per key of ``REPORT_KEYS`` (NaN when no token had loss).

    Collective over ``groups``: every rank calls it, with an empty list where it has no reports
    (only the last pipeline stage has them; summing over (dp_cp, then pp) gives every rank the value).
    """
    sums = report_sums(reports, groups)
    return {k: (float(s[0] / s[1]) if float(s[1]) > 0 else float("nan")) for k, s in zip(REPORT_KEYS, sums)}


def report_sums(
    reports: Sequence[dict[str, torch.Tensor]], groups: Sequence[dist.ProcessGroup | None] = ()
) -> torch.Tensor:
    """float64 ``[len(REPORT_KEYS), 2]``: the ``[num, den]`` pairs summed like ``reduce_reports`` (the
    'token loss' denominator is the number of loss tokens). Collective over ``groups``."""
    sums = torch.zeros(len(REPORT_KEYS), 2, dtype=torch.float64)
    for r in reports:
        sums += torch.stack([r[k].detach().to(torch.float64).cpu() for k in REPORT_KEYS])
    for group in groups:
        sums = all_reduce_sum(sums, group)
    return sums


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """SUM over ``group`` of a CPU tensor, on the device the backend needs; returns a CPU tensor."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    t = t.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.cpu()
