"""The sqrt-normalised loss is exact under any split of the global batch (loss_packing_cp.md §A.6).

A fixed set of samples is cut into random layouts (DP ranks × micro-batches × packed rows × CP
zig-zag shards, with alignment padding); each shard runs the real loss function and megatron's
per-token semantics are emulated exactly: the loss sums are back-propagated, gradients summed over
every shard and divided by the summed integer token counts. The gradient must equal that of the
single-process reference L = Σ_i n_i^-α Σ_t l_t / Σ_i n_i^(1-α) in float64, and negative controls
(per-micro-batch normalisation, no N/S factor) must differ, so the test can fail.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from qwen3vl_testing.distributed import run_distributed
from qwen3vl.train.loss import reduce_reports, step_normalizer, weighted_loss

VOCAB, DIM = 11, 5


@dataclass
class Sample:
    x: torch.Tensor  # [L, DIM] float64 inputs of the tiny model logits = x @ W
    target: torch.Tensor  # [L] int64
    mask: torch.Tensor  # [L] bool: supervised positions

    @property
    def n(self) -> int:
        return int(self.mask.sum())


@dataclass
class Shard:
    """What one (DP rank, micro-batch, CP rank) holds: the concatenation of its pieces of every row."""

    x: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor  # n_i of the owning sample, per position (0 on padding)


def make_samples(seed: int, num: int = 14) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 37] + [int(torch.randint(3, 30, (1,), generator=g)) for _ in range(num - 3)]
    samples = []
    for i, length in enumerate(lengths):
        mask = torch.rand(length, generator=g) < 0.7
        if i == 0:
            mask[:] = True  # a sample with n = 1
        if i == 3:
            mask[:] = False  # a sample without any loss token (weight 0, must not divide by 0)
        samples.append(Sample(torch.randn(length, DIM, generator=g, dtype=torch.float64),
                              torch.randint(0, VOCAB, (length,), generator=g), mask))
    return samples


def zigzag_positions(padded_length: int, cp: int, cp_rank: int) -> list[int]:
    chunk = padded_length // (2 * cp)
    return [*range(cp_rank * chunk, (cp_rank + 1) * chunk),
            *range((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)]


def layout_shards(samples: list[Sample], dp: int, microbatches: int, cp: int, packing: bool,
                  seed: int) -> dict[tuple[int, int, int], Shard]:
    """Random assignment of samples to (dp rank, micro-batch), random rows, per-segment zig-zag."""
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    slots = [(r, m) for r in range(dp) for m in range(microbatches)]
    assignment: dict[tuple[int, int], list[int]] = {s: [] for s in slots}
    for k, idx in enumerate(order):
        assignment[slots[k % len(slots)] if k < len(slots) else rng.choice(slots)].append(idx)
    shards = {}
    for (r, m), idxs in assignment.items():
        if packing:
            rows: list[list[int]] = []
            for idx in idxs:
                if rows and rng.random() < 0.6:
                    rng.choice(rows).append(idx)
                else:
                    rows.append([idx])
        else:
            rows = [[idx] for idx in idxs]
        for c in range(cp):
            parts = []
            for row in rows:
                for idx in row:  # each segment padded to 2·cp and cut into 2·cp chunks
                    s = samples[idx]
                    pad = (-len(s.target)) % (2 * cp)
                    xs = torch.cat([s.x, torch.zeros(pad, DIM, dtype=torch.float64)])
                    ts = torch.cat([s.target, torch.zeros(pad, dtype=torch.long)])
                    ms = torch.cat([s.mask, torch.zeros(pad, dtype=torch.bool)])
                    ns = torch.cat([torch.full((len(s.target),), s.n), torch.zeros(pad, dtype=torch.long)])
                    pos = torch.tensor(zigzag_positions(len(ts), cp, c), dtype=torch.long)
                    parts.append((xs[pos], ts[pos], ms[pos], ns[pos]))
            if parts:
                shards[(r, m, c)] = Shard(*(torch.cat(p) for p in zip(*parts)))
            else:
                shards[(r, m, c)] = Shard(torch.zeros(0, DIM, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                                          torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    return shards


def reference(samples: list[Sample], W: torch.Tensor, exponent: float) -> tuple[torch.Tensor, torch.Tensor]:
    W = W.detach().clone().requires_grad_(True)
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for s in samples:
        if s.n == 0:
            continue
        ce = F.cross_entropy(s.x @ W, s.target, reduction="none")[s.mask]
        num = num + s.n ** (-exponent) * ce.sum()
        den += s.n ** (1 - exponent)
    loss = num / den
    loss.backward()
    return loss.detach(), W.grad


def run_layout(shards: dict, W: torch.Tensor, exponent: float, normalize_per_microbatch: bool = False,
               use_scale: bool = True):
    """Emulates megatron's per-token path on the given shards (see the module docstring)."""
    W = W.detach().clone().requires_grad_(True)
    groups = {}
    for key, sh in shards.items():
        groups.setdefault(key[1] if normalize_per_microbatch else 0, []).append(sh)
    scales = {g: step_normalizer([(sh.mask, sh.counts) for sh in shs], exponent).scale for g, shs in groups.items()}
    total_tokens = torch.zeros((), dtype=torch.int)
    reports = []
    for key, sh in shards.items():
        per_token = F.cross_entropy(sh.x @ W, sh.target, reduction="none")
        scale = scales[key[1] if normalize_per_microbatch else 0] if use_scale else 1.0
        loss_sum, num_tokens, report = weighted_loss(per_token, loss_mask=sh.mask, loss_token_counts=sh.counts,
                                                     exponent=exponent, scale=scale)
        assert num_tokens.dtype == torch.int32  # megatron's accumulator is int32: a float would crash it
        total_tokens += num_tokens
        loss_sum.backward()
        reports.append(report)
    return W.grad / total_tokens, reduce_reports(reports)


LAYOUTS = [(1, 1, 1, False), (2, 1, 1, True), (3, 2, 1, True), (1, 4, 2, True), (4, 3, 4, False),
           (8, 1, 2, True), (2, 2, 4, True), (1, 1, 4, False)]


@pytest.mark.parametrize("exponent", [0.5, 0.0, 1.0])
def test_gradient_and_logged_loss_are_invariant_to_the_split(exponent):
    samples = make_samples(seed=1)
    W = torch.randn(DIM, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss_ref, grad_ref = reference(samples, W, exponent)
    for i, (dp, m, cp, packing) in enumerate(LAYOUTS):
        grad, logged = run_layout(layout_shards(samples, dp, m, cp, packing, seed=10 + i), W, exponent)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-13,
                                   msg=f"layout dp={dp} M={m} cp={cp} packing={packing}")
        assert logged["lm loss"] == pytest.approx(float(loss_ref), rel=1e-12)


def test_exponents_zero_and_one_give_token_and_sample_means():
    samples = make_samples(seed=3)
    W = torch.randn(DIM, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ces = [F.cross_entropy(s.x @ W, s.target, reduction="none")[s.mask] for s in samples if s.n]
    token_mean = torch.cat(ces).mean()
    sample_mean = torch.stack([c.mean() for c in ces]).mean()
    shards = layout_shards(samples, dp=2, microbatches=3, cp=2, packing=True, seed=5)
    _, logged0 = run_layout(shards, W, 0.0)
    _, logged1 = run_layout(shards, W, 1.0)
    assert logged0["lm loss"] == pytest.approx(float(token_mean), rel=1e-12)
    assert logged0["token loss"] == pytest.approx(float(token_mean), rel=1e-12)
    assert logged1["lm loss"] == pytest.approx(float(sample_mean), rel=1e-12)
    assert abs(float(token_mean) - float(sample_mean)) > 1e-3  # the two means really differ here


def test_negative_controls_differ():
    """Per-micro-batch normalisation (InternVL-style with M > 1) and weights without N/S are wrong."""
    samples = make_samples(seed=5)
    W = torch.randn(DIM, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _, grad_ref = reference(samples, W, 0.5)
    shards = layout_shards(samples, dp=2, microbatches=3, cp=2, packing=True, seed=7)
    per_mb, _ = run_layout(shards, W, 0.5, normalize_per_microbatch=True)
    no_scale, _ = run_layout(shards, W, 0.5, use_scale=False)
    assert (per_mb - grad_ref).abs().max() > 1e-4
    assert (no_scale - grad_ref).abs().max() > 1e-4


def test_non_finite_loss_on_a_masked_position_does_not_leak():
    per_token = torch.tensor([1.0, float("nan"), 2.0])
    loss_sum, n, report = weighted_loss(per_token, loss_mask=torch.tensor([True, False, True]),
                                        loss_token_counts=torch.tensor([2, 0, 2]), exponent=0.5, scale=1.0)
    assert torch.isfinite(loss_sum) and int(n) == 2
    assert float(report["lm loss"][0] / report["lm loss"][1]) == pytest.approx(1.5)


# ---- the same on real gloo ranks: the normaliser all-reduces over megatron's dp_cp group -------------------

def distributed_body(dp: int, cp: int) -> float:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=cp)
    dp_rank, cp_rank = ps.get_data_parallel_rank(), ps.get_context_parallel_rank()
    group = ps.get_data_parallel_group(with_context_parallel=True)
    samples = make_samples(seed=8)
    W0 = torch.randn(DIM, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    worst = 0.0
    for exponent in (0.5, 0.0, 1.0):
        loss_ref, grad_ref = reference(samples, W0, exponent)
        for microbatches in (1, 3):
            shards = layout_shards(samples, dp, microbatches, cp, packing=True, seed=11 + microbatches)
            mine = [shards[(dp_rank, m, cp_rank)] for m in range(microbatches)]
            normalizer = step_normalizer([(sh.mask, sh.counts) for sh in mine], exponent, group=group)
            W = W0.clone().requires_grad_(True)
            total = torch.zeros((), dtype=torch.int)
            reports = []
            for sh in mine:
                per_token = F.cross_entropy(sh.x @ W, sh.target, reduction="none")
                loss_sum, n, report = weighted_loss(per_token, loss_mask=sh.mask, loss_token_counts=sh.counts,
                                                    exponent=exponent, scale=normalizer.scale)
                loss_sum.backward()
                total += n
                reports.append(report)
            # What megatron's DDP (per-token mode: sum, not average) and finalize_model_grads do on dp_cp.
            grad = W.grad.clone()
            dist.all_reduce(grad, group=group)
            dist.all_reduce(total, group=group)
            grad /= total
            torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-13)
            assert reduce_reports(reports, groups=[group])["lm loss"] == pytest.approx(float(loss_ref), rel=1e-12)
            worst = max(worst, float((grad - grad_ref).abs().max()))
    return worst


@pytest.mark.parametrize("dp,cp", [(2, 1), (1, 2)])
def test_partition_invariance_on_gloo_ranks(dp, cp):
    """Each rank holds only its shard; the normaliser's all-reduce over dp_cp makes the result exact."""
    assert max(run_distributed(distributed_body, world_size=dp * cp, timeout=120, dp=dp, cp=cp)) < 1e-12
