"""Loader worker processes: each runs its own ``PackedStream`` and sends every batch with its state.

The loader takes batches round-robin and keeps, per worker, the state that came with the last batch it
consumed; so batches prefetched but not consumed are simply produced again after a restore.

Workers are started with ``forkserver``: a clean server process (started once, importing this module)
forks them. Forking the trainer itself would copy a process that already holds a CUDA context, NCCL
communicators and their watchdog threads (their locks can deadlock a child), so a worker never
inherits anything of the trainer but its arguments. Rows are built straight into shared memory, so
handing one to the trainer copies nothing, and into a few slots of it that the trainer gives back once it
is done with a row (``qwen3vl.data.pixel_memory.SharedRowPool``), so a worker maps and zeroes its
memory once, not for every row. Each batch travels with its state and its slot. With a GPU,
a thread in the trainer takes the batches in order and copies them into pinned memory ahead of the
step, so the host-to-device copy is asynchronous and the step does not wait.
"""
from __future__ import annotations

import os
import pickle
import queue
import threading
import time
import traceback
from dataclasses import replace

import torch
import torch.multiprocessing as mp

from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.packed_stream import PackedStream, row_patch_limit
from qwen3vl.data.pixel_memory import SharedRowPool, released_when_unused
from qwen3vl.data.stream import Consumer
from qwen3vl.data.tokenizer import load_tokenizer

END, ERROR = "end", "error"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (cannot happen for our parent, but is alive)
        return True
    return True


def _worker_main(cfg, urls, seq_length, pad_multiple, consumer, seed, state, out_queue, free, trainer_pid) -> None:
    def put(item) -> None:
        while _alive(trainer_pid):
            try:
                out_queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue
        os._exit(0)  # the trainer is gone: nobody will read this

    torch.set_num_threads(1)  # one core per worker is what the worker count is for
    try:
        encoder = SampleEncoder(load_tokenizer(cfg.tokenizer_path), replace(cfg.processing, seq_length=seq_length))
        rows = SharedRowPool(free, max_patches=row_patch_limit(cfg, seq_length, encoder.cfg.merge_size))
        stream = PackedStream(cfg, urls, seq_length=seq_length, pad_multiple=pad_multiple, consumer=consumer,
                              seed=seed, encoder=encoder, pixel_rows=rows)
        if state is not None:
            stream.load_state_dict(state)
        for batch in stream:
            put((batch, stream.state_dict(), rows.slot(batch.pixel_values)))
        put((END, stream.state_dict(), None))  # the final counters, and a state that stays finished
    except BaseException as exc:  # the loader re-raises it in the trainer's process, with this traceback
        put((ERROR, _portable(exc, f"in data worker {consumer.index}:\n{traceback.format_exc()}"), None))
    # Tensors travel through shared memory that this process hands over on request: stay alive until
    # the loader terminates it (or the trainer is gone).
    while _alive(trainer_pid):
        time.sleep(1.0)


def _portable(exc: BaseException, note: str) -> BaseException:
    """``exc`` with ``note`` if it survives pickling (its type and message then reach the trainer), else a
    RuntimeError that says what it was."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        copy = RuntimeError(f"{type(exc).__name__}: {exc}")
    copy.add_note(note)
    return copy


class WorkerPool:
    """``num_workers`` processes, each a ``PackedStream``; ``get(w)`` is worker w's next (batch, state)."""

    def __init__(self, cfg, urls, seq_length, pad_multiple, consumers: list[Consumer], seed: int,
                 states: list[dict | None]):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # the server imports torch and the pipeline once
        self.queues = [ctx.Queue(maxsize=max(1, cfg.prefetch)) for _ in consumers]
        # Row slots a worker: its queue's rows, the one it is building and the one being put, and the trainer's
        # current one (with a GPU: the one being pinned). Beyond that a row gets fresh memory, no wait.
        slots = max(1, cfg.prefetch) + 3
        self.free = [torch.ones(slots, dtype=torch.uint8).share_memory_() for _ in consumers]
        # The last storage received in each slot, kept mapped: the next row in that slot arrives as the same
        # storage (torch's shared-memory cache is keyed by the memory's inode) and maps nothing anew.
        self._mapped: list[list] = [[None] * slots for _ in consumers]
        self.procs = [ctx.Process(target=_worker_main, daemon=True,
                                  args=(cfg, urls, seq_length, pad_multiple, c, seed, s, q, f, os.getpid()))
                      for c, s, q, f in zip(consumers, states, self.queues, self.free)]
        for proc in self.procs:
            proc.start()

    def get(self, worker: int):
        """(batch, state) of ``worker``: its next row, whose pooled pixel memory goes back to the worker
        once nothing refers to it; or (END, final state), or (ERROR, the worker's exception)."""
        while True:
            try:
                batch, state, slot = self.queues[worker].get(timeout=5.0)
            except queue.Empty:
                if not self.procs[worker].is_alive():
                    raise RuntimeError(f"data worker {worker} died (exit code {self.procs[worker].exitcode}) "
                                       "without reporting an error; out of memory?") from None
                continue
            if slot is not None:
                self._mapped[worker][slot] = batch.pixel_values.untyped_storage()
                batch = replace(batch, pixel_values=released_when_unused(batch.pixel_values, self.free[worker], slot))
            return batch, state

    def close(self) -> None:
        # Workers hold nothing worth saving (their state travels with each batch): stop them outright.
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)
        for q in self.queues:
            q.cancel_join_thread()
            q.close()


class PinningReader:
    """A thread that takes the workers' batches in round-robin order (skipping finished workers) and
    pins them, ``depth`` batches ahead; ``get()`` returns (worker, batch, state) in that same order."""

    def __init__(self, pool: WorkerPool, done: list[bool], next_worker: int, depth: int):
        self._pool, self._done, self._next = pool, list(done), next_worker
        self._out: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwen3vl-pin-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not all(self._done):
                worker = self._next
                self._next = (worker + 1) % len(self._done)
                if self._done[worker]:
                    continue
                batch, state = self._pool.get(worker)
                if isinstance(batch, str):
                    self._done[worker] = True  # END, or ERROR: the loader raises it
                else:
                    batch = batch.pin_memory()
                self._put((worker, batch, state))
        except BaseException as exc:  # a dead worker: hand the error itself to the trainer's thread
            self._put((-1, ERROR, exc))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def get(self):
        return self._out.get()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
