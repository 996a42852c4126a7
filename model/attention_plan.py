"""The attention plan of one packed row: which query rows read which key rows, built once per micro-batch.

A packed row holds several segments; attention never crosses a segment and never reads padding keys. The
plan describes the work as *blocks*: a contiguous run of real query rows of one segment and the contiguous
run of key rows it may read. Every block is either square and causal (top-left equals bottom-right),
rectangular and causal with the queries at the end of the key range (a context-parallel chunk reading its
segment's prefix: bottom-right aligned), or bidirectional. Padding queries belong to no block and get a zero
output, so no fully-masked softmax row is ever computed (some GPU kernels return NaN for those).

Everything a kernel needs is computed here, once, and lives on the kernel's device: the gather indices of
every block group, the varlen kernel's ``cu_seqlens`` and ``max_seqlen`` (Python ints), and the CPU path's
bottom-right masks. The host work runs on Python ints, and its results reach the device in ONE copy, so a
layer call does no index arithmetic and no host-device transfer (on a GPU each transfer is a stream sync;
28 LLM layers x a few per layer used to add up to ~100 syncs per forward). The plan is cached on the
micro-batch's ``PackedSeqParams`` object (``plan_for``): every layer of the forward, and a recomputed
layer in backward, reuse it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from qwen3vl.parallel.context_parallel import gathered_key_order

_PLAN_CACHE = "_qwen3vl_attention_plans"


@dataclass(frozen=True)
class BlockGroup:
    """``n`` blocks that share one shape: ``q_len`` queries reading ``k_len`` keys each."""

    q_len: int
    k_len: int
    q_rows: torch.Tensor  # [n, q_len] local query rows
    k_rows: torch.Tensor  # [n, k_len] rows of the key tensor the kernel receives (key order applied)
    # [q_len, k_len] bool, True where a query may read a key: rectangular causal blocks on the CPU only (a
    # GPU uses SDPA's lower-right causal bias instead of a dense mask); None otherwise.
    mask: Optional[torch.Tensor] = None

    @property
    def rectangular_causal(self) -> bool:
        return self.q_len != self.k_len


@dataclass(frozen=True)
class AttentionPlan:
    """The blocks of one packed row for one mask type, one context-parallel rank and one device.

    ``query_index`` [Q] / ``key_index`` [K] are all blocks' rows back to back (group order), and
    ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32) their boundaries: the whole row as one varlen call."""

    causal: bool
    num_query_rows: int
    groups: tuple[BlockGroup, ...]
    query_index: torch.Tensor
    key_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def device(self) -> torch.device:
        return self.query_index.device


def _blocks(cu_seqlens: list[int], cu_seqlens_padded: list[int], causal: bool, cp_size: int,
            cp_rank: int) -> dict[tuple[int, int], tuple[list[int], list[int]]]:
    """(q_len, k_len) -> (first local query row, first global key row) of each block; pure host work."""
    shapes: dict[tuple[int, int], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for s in range(len(cu_seqlens) - 1):
        real = cu_seqlens[s + 1] - cu_seqlens[s]
        padded = cu_seqlens_padded[s + 1] - cu_seqlens_padded[s]
        seg_start = cu_seqlens_padded[s]
        if cp_size == 1:
            chunks = [(seg_start, 0, padded)]  # (first local row, offset in segment, length)
        else:
            chunk = padded // (2 * cp_size)
            local_start = seg_start // cp_size  # every earlier segment gave this rank padded/cp rows
            chunks = [(local_start, cp_rank * chunk, chunk),
                      (local_start + chunk, (2 * cp_size - 1 - cp_rank) * chunk, chunk)]
        for local_row, offset, length in chunks:
            q_len = min(length, real - offset)
            if q_len <= 0:
                continue  # only padding queries here: they attend nothing and output zeros
            k_len = offset + q_len if causal else real
            starts = shapes[(q_len, k_len)]
            starts[0].append(local_row)
            starts[1].append(seg_start)
    return shapes


def build_plan(cu_seqlens: list[int], cu_seqlens_padded: list[int], *, causal: bool, cp_size: int = 1,
               cp_rank: int = 0, key_order: torch.Tensor | None = None,
               device: torch.device | str = "cpu") -> AttentionPlan:
    """The plan of this rank's query rows (zig-zag rows under context parallelism, see
    ``qwen3vl.parallel.context_parallel.zigzag_index``) on ``device``.

    ``key_order`` maps the blocks' key coordinates (the row in natural global order) to rows of the key
    tensor the kernel receives: ``None`` when keys arrive in natural order (no context parallelism), else
    the position of each global row inside the all-gathered (rank-major, zig-zag) keys. Cost: linear in
    the number of segments on the host, then one host-to-device copy."""
    device = torch.device(device)
    shapes = _blocks(cu_seqlens, cu_seqlens_padded, causal, cp_size, cp_rank)
    q_parts, k_parts, q_lens, k_lens, layout = [], [], [], [], []
    for (q_len, k_len), (q_starts, k_starts) in shapes.items():
        q_rows = torch.tensor(q_starts, dtype=torch.long)[:, None] + torch.arange(q_len)
        k_rows = torch.tensor(k_starts, dtype=torch.long)[:, None] + torch.arange(k_len)
        if key_order is not None:
            k_rows = key_order.cpu()[k_rows]
        q_parts.append(q_rows.reshape(-1))
        k_parts.append(k_rows.reshape(-1))
        q_lens += [q_len] * len(q_starts)
        k_lens += [k_len] * len(k_starts)
        layout.append((q_len, k_len, len(q_starts)))
    cu_q = torch.tensor([0] + q_lens, dtype=torch.long).cumsum(0)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.long).cumsum(0)
    empty = torch.empty(0, dtype=torch.long)
    query_index = torch.cat(q_parts) if q_parts else empty
    key_index = torch.cat(k_parts) if k_parts else empty
    # One transfer for every index of the plan; the pieces below are views of it.
    flat = torch.cat([query_index, key_index, cu_q, cu_k]).to(device)
    query_index, key_index, cu_q, cu_k = flat.split([query_index.numel(), key_index.numel(), cu_q.numel(),
                                                     cu_k.numel()])
    groups, q_at, k_at = [], 0, 0
    for q_len, k_len, n in layout:
        mask = None
        if causal and q_len != k_len and device.type == "cpu":
            mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        groups.append(BlockGroup(q_len, k_len, query_index[q_at:q_at + n * q_len].view(n, q_len),
                                 key_index[k_at:k_at + n * k_len].view(n, k_len), mask))
        q_at, k_at = q_at + n * q_len, k_at + n * k_len
    return AttentionPlan(causal=causal, num_query_rows=cu_seqlens_padded[-1] // cp_size, groups=tuple(groups),
                         query_index=query_index, key_index=key_index, cu_seqlens_q=cu_q.to(torch.int32),
                         cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_q=max((g[0] for g in layout), default=0),
                         max_seqlen_k=max((g[1] for g in layout), default=0))


def plan_for(params: PackedSeqParams, *, causal: bool, cp_size: int, cp_rank: int,
             device: torch.device) -> AttentionPlan:
    """The plan of this micro-batch, built on its first use and cached on ``params`` (one object per
    micro-batch), keyed by mask type, CP rank and device. Reading ``cu_seqlens`` costs one device-to-host
    copy per plan, whatever the number of layers."""
    cache = getattr(params, _PLAN_CACHE, None)
    if cache is None:
        cache = {}
        setattr(params, _PLAN_CACHE, cache)
    key = (causal, cp_size, cp_rank, device)
    if key not in cache:
        cu = params.cu_seqlens_q
        cu_padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else cu
        cu_list, cu_padded_list = torch.stack([cu, cu_padded]).tolist()  # one copy to the host
        key_order = None
        if cp_size > 1:
            key_order = gathered_key_order(torch.tensor(cu_padded_list), cp_size)
        cache[key] = build_plan(cu_list, cu_padded_list, causal=causal, cp_size=cp_size, cp_rank=cp_rank,
                                key_order=key_order, device=device)
    return cache[key]
