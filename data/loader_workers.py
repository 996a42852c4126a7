"""Loader worker processes: each runs its own ``PackedStream`` and sends every batch with its state.

The loader takes batches round-robin and keeps, per worker, the state that came with the last batch it
consumed; so batches prefetched but not consumed are simply produced again after a restore.
"""
from __future__ import annotations

import os
import queue
import time
import traceback

import torch
import torch.multiprocessing as mp

from qwen3vl.data.packed_stream import PackedStream
from qwen3vl.data.stream import Consumer

END, ERROR = "end", "error"


def _worker_main(cfg, urls, seq_length, pad_multiple, consumer, seed, encoder, state, out_queue,
                 parent_pid) -> None:
    def parent_alive() -> bool:
        return os.getppid() == parent_pid

    def put(item) -> None:
        while parent_alive():
            try:
                out_queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue
        os._exit(0)  # the trainer is gone: nobody will read this

    # A forked child must not use the intra-op thread pool it inherited (OpenMP is not fork-safe: a
    # parallel op would hang); one thread per worker is also what the worker count is for.
    torch.set_num_threads(1)
    try:
        stream = PackedStream(cfg, urls, seq_length=seq_length, pad_multiple=pad_multiple, consumer=consumer,
                              seed=seed, encoder=encoder)
        if state is not None:
            stream.load_state_dict(state)
        for batch in stream:
            put((batch, stream.state_dict()))
        put((END, stream.state_dict()))  # the final counters, and a state that stays finished
    except BaseException:  # the loader re-raises it in the trainer's process, with this traceback
        put((ERROR, f"data worker {consumer.index}:\n{traceback.format_exc()}"))
    # Tensors travel through shared memory that this process hands over on request: stay alive until
    # the loader terminates it (or the trainer is gone).
    while parent_alive():
        time.sleep(1.0)


class WorkerPool:
    """``num_workers`` processes, each a ``PackedStream``; batches are taken round-robin."""

    def __init__(self, cfg, urls, seq_length, pad_multiple, consumers: list[Consumer], seed: int, encoder,
                 states: list[dict | None]):
        ctx = mp.get_context("fork")
        self.queues = [ctx.Queue(maxsize=max(1, cfg.prefetch)) for _ in consumers]
        self.procs = [ctx.Process(target=_worker_main, daemon=True,
                                  args=(cfg, urls, seq_length, pad_multiple, c, seed, encoder, s, q, os.getpid()))
                      for c, s, q in zip(consumers, states, self.queues)]
        for proc in self.procs:
            proc.start()

    def get(self, worker: int):
        while True:
            try:
                return self.queues[worker].get(timeout=5.0)
            except queue.Empty:
                if not self.procs[worker].is_alive():
                    raise RuntimeError(f"data worker {worker} died (exit code {self.procs[worker].exitcode}) "
                                       "without reporting an error; out of memory?") from None

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
