"""Preemption: SIGTERM / SIGUSR1 -> a flag -> at the end of the step every rank agrees to save and exit 0.

Slurm sends SIGUSR1 (``--signal=USR1@<seconds>``) or SIGTERM before it kills a job, and torchrun
forwards SIGTERM to its workers. The handler only sets a flag (nothing unsafe inside a signal
handler); the loop calls ``agree()`` once per step, which all-reduces the flag (MAX) so that all
ranks stop after the same step even if only some of them received the signal. The same collective
carries the wall-time limit (``train.stop_after_minutes``), whose clock differs slightly per rank.
"""
from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def start_helpers_deaf_to_preemption(signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
    """Starts Python's multiprocessing resource tracker with the preemption signals blocked.

    Slurm signals every process of a job step (``scancel --signal=USR1 <job>.0``), not only the ranks. The
    tracker (started by the data workers' first semaphore) dies of SIGUSR1, is restarted, and then prints
    a ``KeyError`` traceback for every semaphore it never saw. A blocked signal survives its ``exec``, so
    started this way it keeps running and the job log stays clean. Call before any worker starts; no-op
    where there is no tracker (Windows) or one already runs."""
    try:
        from multiprocessing import resource_tracker  # lazy: not on every platform (Windows has no tracker)
    except ImportError:
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionHandler:
    """Context manager that installs the handlers and restores the previous ones on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> "PreemptionHandler":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank if any rank received a preemption signal (collective when distributed)."""
        return self.agree(False, group) == "preempted"

    def agree(self, time_up: bool, group: dist.ProcessGroup | None = None) -> str | None:
        """Whether every rank stops after this step, and why: "preempted" if any rank received a signal,
        else "time_limit" if any rank's wall-time limit is near (``time_up``), else None. One collective."""
        code = 2 if self.received is not None else 1 if time_up else 0
        flag = torch.tensor([code], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            if dist.get_backend(group) == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = {0: None, 1: "time_limit", 2: "preempted"}[int(flag.item())]
        if stop == "preempted":
            log.warning("preemption signal received (%s on this rank): saving a checkpoint and exiting",
                        self.received.name if self.received else "on another rank")
        return stop
