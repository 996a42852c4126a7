"""Attention kernels for packed (THD) rows, all driven by one ``AttentionPlan``.

A packed row holds several segments; attention never crosses a segment and never reads padding keys.
The plan describes the work as *blocks*: a contiguous run of real query rows of one segment and the
contiguous run of key rows it may read. Every block is either square and causal (top-left equals
bottom-right), rectangular and causal with the queries at the end of the key range (a context-parallel
chunk reading its segment's prefix: bottom-right aligned), or bidirectional. Padding queries belong to no
block and get a zero output, so no fully-masked softmax row is ever computed (some GPU kernels return NaN
for those).

Kernels:
  * ``sdpa``  : blocks of equal shape are batched into one ``F.scaled_dot_product_attention`` call, so the
                Python loop runs over distinct shapes, not over samples (ViT frame groups of one image or
                video all share a shape). Exact on CPU; also valid on GPU.
  * ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash varlen kernel, CUDA only). One call for the
                whole row; causal via ``window_size=(-1, 0)``, whose bottom-right alignment is exactly what
                context-parallel chunks need.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class BlockGroup:
    """Blocks that share one shape: ``n`` blocks of ``q_len`` queries reading ``k_len`` keys."""

    q_len: int
    k_len: int
    q_starts: torch.Tensor  # [n] first local query row of each block
    k_starts: torch.Tensor  # [n] first key row (in key-tensor coordinates) of each block

    def q_rows(self) -> torch.Tensor:
        return self.q_starts[:, None] + torch.arange(self.q_len, device=self.q_starts.device)

    def k_rows(self) -> torch.Tensor:
        return self.k_starts[:, None] + torch.arange(self.k_len, device=self.k_starts.device)


@dataclass
class AttentionPlan:
    """The blocks of one packed row for one mask type and one context-parallel rank.

    ``key_order`` maps key-tensor coordinates used by the blocks (the row in natural global order) to rows
    of the tensor the kernel receives: ``None`` when keys arrive in natural order (no context parallelism),
    else the position of each global row inside the all-gathered (rank-major, zig-zag) keys.
    """

    causal: bool
    num_query_rows: int
    groups: list[BlockGroup] = field(default_factory=list)
    key_order: torch.Tensor | None = None

    def to(self, device: torch.device) -> "AttentionPlan":
        moved = [BlockGroup(g.q_len, g.k_len, g.q_starts.to(device), g.k_starts.to(device)) for g in self.groups]
        order = None if self.key_order is None else self.key_order.to(device)
        return AttentionPlan(self.causal, self.num_query_rows, moved, order)


def build_plan(cu_seqlens: list[int], cu_seqlens_padded: list[int], *, causal: bool,
               cp_size: int = 1, cp_rank: int = 0, key_order: torch.Tensor | None = None) -> AttentionPlan:
    """Blocks of this rank's query rows (zig-zag rows under context parallelism, see
    ``qwen3vl.parallel.context_parallel.zigzag_index``). Pure host work on Python ints, done once per
    micro-batch (the caller caches it); its cost is linear in the number of segments."""
    shapes: dict[tuple[int, int], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    num_segments = len(cu_seqlens) - 1
    for s in range(num_segments):
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
    groups = [BlockGroup(q_len, k_len, torch.tensor(qs, dtype=torch.long), torch.tensor(ks, dtype=torch.long))
              for (q_len, k_len), (qs, ks) in shapes.items()]
    num_rows = cu_seqlens_padded[-1] // cp_size
    return AttentionPlan(causal=causal, num_query_rows=num_rows, groups=groups, key_order=key_order)


def _key_rows(plan: AttentionPlan, rows: torch.Tensor) -> torch.Tensor:
    return rows if plan.key_order is None else plan.key_order[rows]


def sdpa_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: AttentionPlan, *,
                scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """query [Tq, Hq, D], key/value [Tk, Hkv, D] -> [Tq, Hq, D]; zeros at padding query rows."""
    enable_gqa = query.shape[1] != key.shape[1]
    outputs, rows = [], []
    for group in plan.groups:
        q_rows = group.q_rows()
        k_rows = _key_rows(plan, group.k_rows())
        q = query[q_rows].transpose(1, 2)  # [n, Hq, q_len, D]
        k = key[k_rows].transpose(1, 2)
        v = value[k_rows].transpose(1, 2)
        mask, is_causal = None, False
        if plan.causal and group.q_len == group.k_len:
            is_causal = True
        elif plan.causal:
            # Queries are the last q_len positions of the key range (bottom-right aligned causal).
            mask = torch.ones(group.q_len, group.k_len, dtype=torch.bool, device=query.device)
            mask = mask.tril(group.k_len - group.q_len)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        outputs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[-1]))  # [n*q_len, Hq, D]
        rows.append(q_rows.reshape(-1))
    result = query.new_zeros(plan.num_query_rows, query.shape[1], value.shape[-1])
    if outputs:
        result = result.index_copy(0, torch.cat(rows), torch.cat(outputs))
    return result


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def varlen_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: AttentionPlan, *,
                  scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Same contract as ``sdpa_packed`` through the flash varlen kernel (CUDA, fp16/bf16, no dropout).

    Every block becomes one varlen "sequence": its queries and its key range are gathered contiguously
    (a causal context-parallel chunk re-reads its segment's prefix; the flash kernel's bottom-right causal
    alignment then masks exactly as ``build_plan`` intends)."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p:
        raise ValueError("the varlen kernel has no attention dropout: set attention_dropout=0 or use kernel='sdpa'")
    q_rows, k_rows, q_lens, k_lens = [], [], [], []
    for group in plan.groups:
        q_rows.append(group.q_rows().reshape(-1))
        k_rows.append(_key_rows(plan, group.k_rows()).reshape(-1))
        q_lens.append(torch.full((group.q_starts.numel(),), group.q_len, dtype=torch.int32))
        k_lens.append(torch.full((group.k_starts.numel(),), group.k_len, dtype=torch.int32))
    result = query.new_zeros(plan.num_query_rows, query.shape[1], value.shape[-1])
    if not q_rows:
        return result
    q_index, k_index = torch.cat(q_rows), torch.cat(k_rows)
    cu_q = F.pad(torch.cat(q_lens).cumsum(0, dtype=torch.int32), (1, 0)).to(query.device)
    cu_k = F.pad(torch.cat(k_lens).cumsum(0, dtype=torch.int32), (1, 0)).to(query.device)
    out = varlen_attn(query[q_index], key[k_index], value[k_index], cu_q, cu_k,
                      max(g.q_len for g in plan.groups), max(g.k_len for g in plan.groups), scale=scale,
                      window_size=(-1, 0) if plan.causal else (-1, -1),
                      enable_gqa=query.shape[1] != key.shape[1])
    return result.index_copy(0, q_index, out)


KERNELS = {"sdpa": sdpa_packed, "varlen": varlen_packed}


def resolve_kernel(name: str, dtype: torch.dtype, dropout_p: float = 0.0) -> str:
    """``auto`` picks varlen on CUDA for half precision without dropout (what flash varlen supports), else sdpa."""
    if name == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        return "varlen" if varlen_available() and half and not dropout_p else "sdpa"
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}: choose one of auto, {', '.join(KERNELS)}")
    if name == "varlen" and not varlen_available():
        raise ValueError("kernel='varlen' needs CUDA and torch.nn.attention.varlen: use kernel='sdpa' or 'auto'")
    return name
