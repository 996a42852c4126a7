"""Cost balance across data-parallel ranks: the rows of one global batch go where the step costs the same.

Packing fills every row to about ``seq_length`` tokens, but rows still cost different amounts: causal
attention grows with Σ s_i² over a row's samples, the ViT with Σ (patches of a frame group)², and a
text row runs no ViT at all. A step lasts as long as its slowest data-parallel rank, so rows are
assigned by cost (``row_cost``: the model FLOPs of ``qwen3vl.train.flops``), not by arrival order.

``plan_assignment`` is a deterministic swap search that every rank runs on the same gathered costs:
starting from arrival order, it swaps rows between ranks while that lowers the most loaded rank (or,
when no single swap can, evens out another pair), so each rank keeps its number of micro-batches.
Rows do move (about two thirds of them at DP8 with 4 rows a rank on the standard mix, see
docs/benchmarks.md): the pair-evening rounds trade moves for a lower maximum. Costs are quantised to
integers first: every rank must compute the same plan bit for bit, and integer sums do not depend on
the CPU's vector width the way float reductions can.

``DataParallelBalancer`` runs it each step: one small all-gather (per row: cost, tensor shapes, size
of its trace record), then the moved rows travel point-to-point within the data-parallel group.

It changes no gradient: the square-root loss is normalised over the whole global batch (the look-ahead
all-reduce in ``qwen3vl.train.step``) and gradients are summed over data-parallel ranks, so where a row
is computed changes only the order of floating-point sums (tests/train/test_dp_balance.py compares DP2
with rows moved against one rank).
"""
from __future__ import annotations

import pickle
from dataclasses import fields, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from qwen3vl.train.flops import FlopDims, batch_flops

_RESOLUTION = 2 ** 20  # integer cost units: the costliest row of the step is 2**20 (a millionth is ample)


def row_cost(dims: FlopDims, row: Any, trainable: Sequence[str] = ("all",)) -> float:
    """What a row costs a rank's step: its model FLOPs (forward and backward)."""
    return batch_flops(dims, row, trainable).total


def _quantised(costs: Sequence[Sequence[float]]) -> np.ndarray:
    cost = np.asarray(costs, dtype=np.float64)
    top = float(cost.max(initial=0.0))
    return np.rint(cost * (_RESOLUTION / top)).astype(np.int64) if top > 0 else np.zeros(cost.shape, np.int64)


def plan_assignment(costs: Sequence[Sequence[float]], candidates: int = 8) -> list[list[tuple[int, int]]]:
    """For each rank, the (source rank, row index) of the rows it computes. ``costs[r]``: the costs of
    rank r's rows in arrival order (every rank the same number).

    Each round swaps a row of the most loaded rank with one of a lightly loaded rank when that lowers
    the larger of their loads; when no such swap exists, it evens out the pair of ranks (among the
    ``candidates`` most and least loaded ones, which bounds the work at thousands of ranks) whose swap
    most reduces the sum of squared loads, which opens new swaps for the maximum. Every round lowers
    that sum, so the search ends; it stops when neither kind of swap helps."""
    cost = _quantised(costs)  # [ranks, rows]: the cost of what each slot holds now
    ranks, per_rank = cost.shape
    held = np.arange(ranks * per_rank).reshape(ranks, per_rank)  # what each slot holds: src * per_rank + i
    loads = cost.sum(axis=1)
    if per_rank < 2:
        return [[divmod(int(x), per_rank) for x in row] for row in held]

    def best_swap(x: int, y: int) -> tuple[int, int, int]:
        """The swap (slot i of x, slot j of y) leaving the larger of the two loads lowest: (that load, i, j)."""
        delta = cost[x][:, None] - cost[y][None, :]  # what moves from x to y by swapping (i, j)
        worse = np.maximum(loads[x] - delta, loads[y] + delta)
        i, j = np.unravel_index(int(np.argmin(worse)), worse.shape)
        return int(worse[i, j]), int(i), int(j)

    for _ in range(4 * ranks * per_rank):
        order = np.argsort(loads, kind="stable")
        hi = int(order[-1])
        best = None
        for lo in order[:candidates].tolist():
            if lo != hi:
                worse, i, j = best_swap(hi, lo)
                if worse < loads[hi] and (best is None or worse < best[0]):
                    best = (worse, hi, lo, i, j)
        if best is None:  # the maximum cannot drop by one swap: even out another pair instead
            for x in order[::-1][:candidates].tolist():
                for y in order[:candidates].tolist():
                    if loads[x] <= loads[y]:
                        continue
                    worse, i, j = best_swap(x, y)
                    # Less sum of squared loads (the pair's sum is kept): Python ints, no overflow.
                    gain = int(loads[x] - loads[y]) ** 2 - (2 * worse - int(loads[x] + loads[y])) ** 2
                    if gain > 0 and (best is None or gain > best[0]):
                        best = (gain, x, y, i, j)
        if best is None:
            break
        _, x, y, i, j = best
        moved = cost[x, i] - cost[y, j]
        cost[x, i], cost[y, j] = cost[y, j], cost[x, i]
        held[x, i], held[y, j] = held[y, j], held[x, i]
        loads[x] -= moved
        loads[y] += moved
    return [[divmod(int(x), per_rank) for x in row] for row in held]


class DataParallelBalancer:
    """``balance(rows) -> rows``: this rank's micro-batches of the step after the cost balance (collective
    over ``group``, the pure data-parallel group; every TP/PP/CP peer of a replica does the same, with the
    same rows, in its own data-parallel group)."""

    def __init__(self, cost: Callable[[Any], float], group=None, device: torch.device | None = None):
        self.cost, self.group = cost, group
        self.device = device if device is not None else torch.device("cpu")
        self.moved = 0  # rows this rank sent away so far (tests and logs)

    def __call__(self, rows: list) -> list:
        size = dist.get_world_size(self.group)
        if size == 1 or len(rows) < 2:
            return rows
        me = dist.get_rank(self.group)
        template = rows[0]
        tensors = [f.name for f in fields(template) if isinstance(getattr(template, f.name), torch.Tensor)]
        others = [f.name for f in fields(template) if f.name not in tensors]
        extras = [pickle.dumps({n: getattr(r, n) for n in others}) for r in rows]  # e.g. the trace's origins
        # Per row: cost, every tensor's shape, the size of the rest (float64 holds them all exactly).
        meta = torch.tensor([[self.cost(r), *[d for n in tensors for d in getattr(r, n).shape], len(x)]
                             for r, x in zip(rows, extras)], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(meta) for _ in range(size)]
        dist.all_gather(gathered, meta, group=self.group)
        everyone = torch.stack(gathered).cpu().numpy()  # [rank, row, meta]
        plan = plan_assignment(everyone[:, :, 0].tolist())
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else list(range(size))

        def shapes(src: int, index: int) -> list[tuple[int, ...]]:
            dims, out, at = everyone[src, index, 1:-1].astype(np.int64).tolist(), [], 0
            for n in tensors:
                ndim = getattr(template, n).dim()
                out.append(tuple(dims[at:at + ndim]))
                at += ndim
            return out

        ops, received = [], {}
        for dst in range(size):  # every rank walks the moves in the same order, so sends and receives pair up
            for slot, (src, index) in enumerate(plan[dst]):
                if src == dst or me not in (src, dst):
                    continue
                if src == me:
                    row = rows[index]
                    payload = [getattr(row, n).to(self.device).contiguous() for n in tensors]
                    payload.append(torch.frombuffer(bytearray(extras[index]), dtype=torch.uint8).to(self.device))
                    self.moved += 1
                    kind = dist.isend
                else:
                    payload = [torch.empty(shape, dtype=getattr(template, n).dtype, device=self.device)
                               for n, shape in zip(tensors, shapes(src, index))]
                    payload.append(torch.empty(int(everyone[src, index, -1]), dtype=torch.uint8, device=self.device))
                    received[slot] = payload
                    kind = dist.irecv
                peer = ranks[dst] if src == me else ranks[src]
                ops += [dist.P2POp(kind, t, peer, self.group) for t in payload if t.numel()]  # both sides skip empties
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        out = []
        for slot, (src, index) in enumerate(plan[me]):
            if src == me:
                out.append(rows[index])
            else:
                *values, extra = received[slot]
                out.append(replace(template, **dict(zip(tensors, values)), **pickle.loads(extra.cpu().numpy().tobytes())))
        return out
