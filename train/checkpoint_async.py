"""Asynchronous checkpoint saves: a background process writes the shards while training goes on, and
the save is committed (the tracker moves) only once every rank's writer has finished.

This is megatron's async dist checkpointing: ``dist_checkpointing.save(..., async_sharded_save=True)``
stages what this rank writes to host memory (a GPU-to-host copy; on CPU the writer is a forked process,
whose copy-on-write pages keep the values of the moment of the save) and returns an ``AsyncRequest``.
Its finalize functions (the DCP metadata, ``metadata.json``) must run on every rank after all writers
are done; ``AsyncCallsQueue`` checks that collectively and then runs them in order.

The commit rule is the synchronous save's (``qwen3vl.train.checkpoint``): the commit (barrier, tracker
replaced atomically, retention) is appended as the *last* finalize function, so the tracker never names
a checkpoint whose shards or metadata are still being written. A crash before that leaves the previous
checkpoint as latest and the partial directory is removed by the next save. One save is in flight at a
time: a new save first waits for the previous one and commits it.
"""
from __future__ import annotations

from typing import Callable

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue


class AsyncSaver:
    """The background writer of one training run; every method is collective (call it on all ranks)."""

    def __init__(self) -> None:
        # A forked writer per save (megatron's TemporalAsyncCaller): no persistent worker to keep alive.
        self._queue = AsyncCallsQueue(persistent=False)

    @property
    def in_flight(self) -> bool:
        return self._queue.get_num_unfinalized_calls() > 0

    def schedule(self, request, commit: Callable[[], None]) -> None:
        """Starts writing ``request`` (from ``dist_checkpointing.save(..., async_sharded_save=True)``);
        ``commit`` runs on every rank after the checkpoint is complete."""
        self.wait()
        request.add_finalize_fn(commit)
        self._queue.schedule_async_request(request)

    def poll(self) -> None:
        """Commits a save whose writers all finished; returns at once otherwise (once per step)."""
        if self.in_flight:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Blocks until the save in flight is written and committed."""
        if self.in_flight:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        self.wait()
        self._queue.close()
