"""What a training rank does when it fails: record why, print it once, exit 1.

``report_rank_failure`` writes the rank's record (qwen3vl.train.failure_record) and prints one line;
the traceback goes to the console only when the failure is the rank's own and its message does not
already name cause and fix (bad data, bad config, divergence): the record always has it. Collateral
failures (a collective that lost its peer, ``PeerFailure``) are one line each, so the console is not
a wall of identical stack frames from every rank.
"""
from __future__ import annotations

import os
import socket
import time
import traceback

import torch.distributed as dist

from qwen3vl.data.dataset_errors import DatasetError
from qwen3vl.data.robust import TooManyBadSamples
from qwen3vl.train.config import ConfigError
from qwen3vl.train.console import write_whole
from qwen3vl.train.draw import PeerFailure
from qwen3vl.train.failure_record import one_line, write_record
from qwen3vl.train.step import NonFiniteLossError

# What a collective raises when a peer is gone: the symptom on the surviving ranks, not a cause.
_COLLECTIVE_SYMPTOMS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL",
                        "ProcessGroupGloo", "gloo/transport", "Socket Timeout", "DistNetworkError")


def is_collateral(exc: BaseException) -> bool:
    """Whether ``exc`` is how a rank learns that another one failed (not a failure of its own)."""
    if isinstance(exc, PeerFailure) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, RuntimeError) and any(symptom in text for symptom in _COLLECTIVE_SYMPTOMS)


def _rank() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def record_exception(directory: str | os.PathLike, exc: BaseException) -> dict:
    """Writes this rank's record for ``exc`` and returns it."""
    peer = exc if isinstance(exc, PeerFailure) else None
    record = {
        "rank": _rank(), "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "host": socket.gethostname(),
        "pid": os.getpid(), "time": time.time(),
        "type": peer.type_name if peer else type(exc).__name__,
        "message": peer.message if peer else str(exc),
        "collateral": is_collateral(exc), "origin_rank": peer.origin_rank if peer else None,
        "traceback": "".join(traceback.format_exception(exc)),
    }
    record["path"] = str(write_record(directory, record))
    return record


def explains_itself(exc: BaseException) -> bool:
    """Errors whose message names the cause and the fix (bad data, bad config, divergence): no traceback."""
    return isinstance(exc, (DatasetError, TooManyBadSamples, ConfigError, NonFiniteLossError))


def report_rank_failure(directory: str | os.PathLike, exc: BaseException, prog: str = "qwen3vl-train") -> int:
    """A rank's end on ``exc``: its record in ``directory``, its traceback (if the failure is its own and
    not one that explains itself), one line; returns the exit code, 1."""
    record = record_exception(directory, exc)
    where = f"rank {record['rank']}"
    # Each piece in one write (write_whole): the ranks share the console's pipe and often fail together.
    if not record["collateral"]:
        if not explains_itself(exc):
            write_whole("".join(traceback.format_exception(exc)))
        write_whole(f"[{prog}] {where} failed: {record['type']}: {one_line(record['message'])}")
    elif record["origin_rank"] is not None:
        write_whole(f"[{prog}] {where} stopped: rank {record['origin_rank']} failed: {record['type']}: "
                    f"{one_line(record['message'])}")
    else:  # the symptom of another rank's failure: one line, the traceback is in the record
        write_whole(f"[{prog}] {where} stopped: a collective failed ({record['type']}: "
                    f"{one_line(record['message'])[:200]}), most likely because another rank failed first; "
                    f"traceback in {record['path']}")
    return 1
