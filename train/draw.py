"""Drawing a step's micro-batches: a data failure on one rank stops every rank, with that rank's message.

Each rank reads its own share of the data, so a broken dataset, too many bad samples or a dead loader
worker shows on one rank first, maybe steps before the others. If that rank simply raised, the others
would block in the step's first collective until it times out (NCCL) or fail there with a "connection
closed" error that says nothing of the cause (gloo). So after drawing, every rank takes part in one
tiny all-reduce (MIN over the world of "my rank if I failed, else the world size"); if some rank
failed, the lowest such rank broadcasts its exception's type and message, it re-raises its own
exception and every other rank raises ``PeerFailure`` with the same type and message. Cost: one 4-byte
all-reduce per step, besides the step's own collectives.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """Another rank (``origin_rank``) failed; this rank stops with its error type and message."""

    def __init__(self, origin_rank: int, type_name: str, message: str):
        super().__init__(message)
        self.origin_rank, self.type_name, self.message = origin_rank, type_name, message

    def __reduce__(self):
        return type(self), (self.origin_rank, self.type_name, self.message)


def draw_microbatches(loader: Iterator[Any], count: int) -> list[Any]:
    """``count`` items from ``loader``; raises on every rank if drawing failed on any. Collective."""
    error: Exception | None = None
    items: list[Any] = []
    try:
        items = [next(loader) for _ in range(count)]
    except Exception as exc:  # noqa: BLE001 - whatever it is, every rank must learn of it
        error = exc
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return items
    rank, world = dist.get_rank(), dist.get_world_size()
    flag = torch.tensor([rank if error is not None else world], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    origin = int(flag.item())
    if origin == world:
        return items
    what = [(type(error).__name__, str(error)) if rank == origin else None]
    dist.broadcast_object_list(what, src=origin)
    if rank == origin:
        raise error
    raise PeerFailure(origin, *what[0])
