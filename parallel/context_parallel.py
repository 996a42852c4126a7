"""Context parallelism (CP) for packed rows: the zig-zag split, the per-rank model inputs, the K/V
all-gather, and the vision encoder split across the CP group.

Every segment of a packed row (padded to a multiple of 2·CP by the packer) is cut into 2·CP equal chunks;
rank r keeps chunks r and 2·CP-1-r of *each* segment, so every rank does the same causal work per segment
(chunk j costs ∝ 2j+1 and r + (2·CP-1-r) is constant). ``cu_seqlens`` stay global, as transformer-engine
expects. Tokens, labels, position ids, loss weights and the visual ordinal are all cut with the one index
``zigzag_index`` returns, so nothing can drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwen3vl.data.batch import TEXT, PackedBatch
from qwen3vl.parallel.micro_batch import MicroBatch, build_packed_seq_params


def zigzag_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[T / cp_size] int64 global row positions held by ``cp_rank``: per segment, chunk ``cp_rank`` then
    chunk ``2·cp_size-1-cp_rank`` (of 2·cp_size), segments in row order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    bounds = cu_seqlens_padded.long().cpu()
    padded = bounds[1:] - bounds[:-1]
    if bool((padded % (2 * cp_size) != 0).any()):
        bad = padded[padded % (2 * cp_size) != 0].tolist()
        raise ValueError(f"padded segment lengths {bad} are not multiples of 2*CP={2 * cp_size}: pack the data "
                         f"with pad_multiple a multiple of {2 * cp_size} (set it from the context-parallel size)")
    chunk = padded // (2 * cp_size)
    starts = torch.stack([bounds[:-1] + cp_rank * chunk, bounds[:-1] + (2 * cp_size - 1 - cp_rank) * chunk], 1)
    lengths = chunk.repeat_interleave(2)
    starts = starts.reshape(-1)
    first_of_run = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.repeat_interleave(starts, lengths) + torch.arange(int(lengths.sum())) - first_of_run


def gathered_key_order(cu_seqlens_padded: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[T] int64: for each global row, its position in the rank-major concatenation of all ranks' rows."""
    order = torch.cat([zigzag_index(cu_seqlens_padded, cp_size, r) for r in range(cp_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse


def visual_ordinal(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """[T] int64: k for the k-th visual token of the row (images and videos in row order), -1 for text."""
    visual = mm_token_type_ids != TEXT
    return torch.where(visual, visual.long().cumsum(0) - 1, torch.full_like(mm_token_type_ids, -1))


class _AllGatherRows(torch.autograd.Function):
    """Concatenate equal-sized row blocks of every rank along dim 0; backward sums the gradient of the
    gathered tensor over ranks (every rank's queries read every rank's keys) and keeps this rank's rows.
    gloo has no reduce_scatter, hence all_reduce + slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather of equal-sized blocks along dim 0 (rank-major)."""
    return _AllGatherRows.apply(local, group)


def all_gather_key_value(key: torch.Tensor, value: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather K and V (before GQA head repetition: K/V are the small tensors) in one collective."""
    split = key.shape[-1]
    both = all_gather_rows(torch.cat([key, value], dim=-1), group)
    return both[..., :split], both[..., split:]


def model_inputs(batch: PackedBatch, cp_rank: int = 0, cp_size: int = 1) -> MicroBatch:
    """This CP rank's share of one packed row, as the model and the loss consume it.

    Every per-token field is cut with the one zig-zag index (``gather_index``); packed_seq_params keep the
    global cu_seqlens, and pixel_values / grid_thw are the full row's media (the vision split across CP
    ranks is ``encode_vision_across_cp``'s job). ``visual_index`` is the ordinal of each visual token in the
    *full* row, so vision and DeepStack embeddings (computed for the whole row) are selected with
    ``features[visual_index[visual_index >= 0]]``.
    """
    if cp_size == 1:
        index = torch.arange(batch.seq_length, device=batch.tokens.device)
    else:
        index = zigzag_index(batch.cu_seqlens_padded, cp_size, cp_rank).to(batch.tokens.device)

    def take(x: torch.Tensor) -> torch.Tensor:
        return x if cp_size == 1 else x[..., index]

    return MicroBatch(
        input_ids=take(batch.tokens),
        position_ids=take(batch.position_ids),
        labels=take(batch.labels),
        loss_token_counts=take(batch.token_sample_loss_tokens()),
        visual_index=take(visual_ordinal(batch.mm_token_type_ids)),
        gather_index=index,
        packed_seq_params=build_packed_seq_params(batch.cu_seqlens, batch.cu_seqlens_padded),
        pixel_values=batch.pixel_values,
        grid_thw=batch.grid_thw,
        row_length=batch.seq_length,
    )


# --- the vision encoder across the CP group ---------------------------------------------------------

@dataclass
class VisionSplit:
    """Media units (images, or single frame groups of videos) and the CP rank that encodes each.

    Units keep the row order of ``grid_thw``; ``tokens`` counts merged LLM tokens (t·h·w / merge²)."""

    grid: torch.Tensor  # [U, 3] (t, h, w) of each unit
    patch_start: list[int]
    patches: list[int]
    tokens: list[int]
    cost: list[int]  # t·(h·w)²: ViT attention is full within each frame group, so cost grows with patches²
    owner: list[int]

    def units_of(self, rank: int) -> list[int]:
        return [u for u, r in enumerate(self.owner) if r == rank]

    def load(self, rank: int) -> int:
        return sum(self.cost[u] for u in self.units_of(rank))


def split_media_by_cost(grid_thw: torch.Tensor, cp_size: int, *, split_videos: bool = True,
                        spatial_merge_size: int = 2) -> VisionSplit:
    """Greedy longest-processing-time assignment of media units to ``cp_size`` ranks by cost Σ patches².

    With ``split_videos`` each frame group of a video (grid row (1, h, w)) is its own unit: the ViT attends
    within a frame group only and its position encodings do not depend on t, so encoding frame groups
    separately gives the same embeddings, and a long video no longer lands on one rank. Deterministic
    (ties go to the lower rank), so every rank computes the same split from the same ``grid_thw``."""
    grids, patch_start, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        pieces = [(1, h, w)] * t if split_videos else [(t, h, w)]
        for piece in pieces:
            grids.append(piece)
            patch_start.append(offset)
            offset += piece[0] * piece[1] * piece[2]
    patches = [t * h * w for t, h, w in grids]
    tokens = [p // spatial_merge_size ** 2 for p in patches]
    cost = [t * (h * w) ** 2 for t, h, w in grids]
    owner, load = [0] * len(grids), [0] * cp_size
    for unit in sorted(range(len(grids)), key=lambda u: (-cost[u], u)):
        rank = min(range(cp_size), key=lambda r: (load[r], r))
        owner[unit] = rank
        load[rank] += cost[unit]
    grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    return VisionSplit(grid, patch_start, patches, tokens, cost, owner)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _resolve_cp_group(cp_group):
    if cp_group is not None:
        return cp_group
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    return parallel_state.get_context_parallel_group()


def encode_vision_across_cp(encoder_fn: Callable, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                            cp_group=None, *, split_videos: bool = True, spatial_merge_size: int = 2,
                            on_idle: Optional[Callable[[], Optional[torch.Tensor]]] = None):
    """Encode a micro-batch's media split across the CP group and return every rank the full result.

    ``encoder_fn(pixels [N, 1536], grid [M, 3]) -> (merged [n_tok, H], [deepstack_j [n_tok, H], ...])`` runs
    on this rank's units only (``split_media_by_cost``); the embeddings are all-gathered back into the
    original media order. Autograd: each rank's units receive the gradient summed over all ranks, so the
    encoder's parameter gradients, summed over CP (as DDP does over dp_cp), equal the unsplit ones.

    Every rank runs the same collectives even when it encodes nothing (an empty tensor that requires grad
    stands in), so the gathered tensors must enter the loss graph on every rank (an empty selection counts).
    ``on_idle()``, called on a rank that encodes nothing, may return a 0-valued scalar tied to the encoder's
    parameters, which is added to that rank's (empty) share so that those parameters still get a (zero)
    gradient there (see ``Qwen3VLModel._vision_keepalive``).

    Returns None, without any collective, when the row has no media: ``grid_thw`` is the same on every CP
    rank, so all ranks take that branch together. Without a CP group (or CP=1) it is ``encoder_fn`` itself.
    """
    if grid_thw.numel() == 0:
        return None
    group = _resolve_cp_group(cp_group)
    if group is None or dist.get_world_size(group) == 1:
        return encoder_fn(pixel_values, grid_thw)
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    split = split_media_by_cost(grid_thw, cp_size, split_videos=split_videos,
                                spatial_merge_size=spatial_merge_size)
    mine = split.units_of(rank)
    device = grid_thw.device  # the compute device; the pixels may still be on the host (only a share moves)

    local = None
    if mine:
        rows = torch.cat([torch.arange(split.patch_start[u], split.patch_start[u] + split.patches[u]) for u in mine])
        merged, deepstack = encoder_fn(pixel_values[rows.to(pixel_values.device)], split.grid[mine].to(device))
        local = torch.cat([merged, *deepstack], dim=-1)  # one collective for all features, one backward
        meta = [local.shape[0], local.shape[1], 1 + len(deepstack), _DTYPES.index(local.dtype),
                int(local.requires_grad)]
    else:
        meta = [0, 0, 0, 0, 0]
    metas = [torch.zeros(5, dtype=torch.long, device=device) for _ in range(cp_size)]
    dist.all_gather(metas, torch.tensor(meta, dtype=torch.long, device=device), group=group)
    metas = torch.stack(metas).cpu()
    source = int(metas[:, 0].argmax())  # a rank that encoded something tells the width and dtype
    width, num_parts, dtype = int(metas[source, 1]), int(metas[source, 2]), _DTYPES[int(metas[source, 3])]
    needs_grad = bool(metas[:, 4].any())
    if local is None:
        local = torch.zeros(0, width, dtype=dtype, device=device, requires_grad=needs_grad)
        keepalive = on_idle() if on_idle is not None else None
        if keepalive is not None:
            local = local + keepalive.to(dtype)  # still [0, width]: adds nothing, but reaches the parameters
    elif needs_grad and not local.requires_grad:
        local = local.detach().requires_grad_()  # e.g. a frozen encoder here: keep every rank's backward alike

    max_tokens = int(metas[:, 0].max())
    padded = torch.nn.functional.pad(local, (0, 0, 0, max_tokens - local.shape[0]))
    gathered = all_gather_rows(padded, group)
    offsets = [0] * cp_size
    order = []
    for unit in range(len(split.owner)):  # original media order
        owner = split.owner[unit]
        start = owner * max_tokens + offsets[owner]
        order.append(torch.arange(start, start + split.tokens[unit]))
        offsets[owner] += split.tokens[unit]
    full = gathered[torch.cat(order).to(device)]
    parts = full.split(width // num_parts, dim=-1)
    return parts[0], list(parts[1:])
