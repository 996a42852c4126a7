"""Preemption: SIGTERM / SIGUSR1 -> a flag -> at the end of the step every rank agrees to save and exit 0.

Slurm sends SIGUSR1 (``--signal=USR1@<seconds>``) or SIGTERM before it kills a job, and torchrun
forwards SIGTERM to its workers. The handler only sets a flag (nothing unsafe inside a signal
handler); the loop calls ``should_stop()`` once per step, which all-reduces the flag (MAX) so that
all ranks stop after the same step even if only some of them received the signal.
"""
from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            if dist.get_backend(group) == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item())
        if stop:
            log.warning("preemption signal received (%s on this rank): saving a checkpoint and exiting",
                        self.received.name if self.received else "on another rank")
        return stop
