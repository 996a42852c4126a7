"""Per-rank failure records: why each rank of a failed run stopped, and which of them failed first.

When a rank fails, the others fail too, in a collective ("Connection closed by peer", an NCCL timeout)
or because ``PeerFailure`` stopped them (qwen3vl.train.draw): their errors are collateral. Each rank
that stops on an exception (qwen3vl.train.rank_failure) writes ``<run_dir>/failures/rank-<R>.json`` (type, message, time, host,
pid, traceback, whether it is collateral and, if known, the rank it came from); the torchrun wrapper
(qwen3vl.launch.elastic) writes one for a rank that died without a Python error (SIGKILL, the
out-of-memory killer, a crash in native code). The launcher (torchrun or Slurm) then reports the
root cause as its last line, ``qwen3vl-launch: rank R failed: <ExceptionType>: <message>``: the
earliest record that is not collateral (else the earliest one), with the others summarised in the
line before it. The files stay in the run directory: nothing of the crash is lost.

This module only writes, reads and reports records (no torch: the launcher's report stays quick);
what a rank does when it fails is qwen3vl.train.rank_failure.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

FAILURES_DIR = "failures"
_MAX_MESSAGE = 2000


def failures_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FAILURES_DIR


def one_line(text: str) -> str:
    """A message on one line (multi-line messages, e.g. config problems, keep every part)."""
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_MESSAGE else line[:_MAX_MESSAGE] + " ..."


def write_record(directory: str | os.PathLike, record: dict) -> Path:
    """Writes ``record`` as ``rank-<R>.json`` atomically (a reader never sees half a file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank-{int(record['rank']):05d}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def record_death(directory: str | os.PathLike, rank: int, exitcode: int, signal_name: str, host: str,
                 pid: int, when: float, collateral: bool = False) -> dict:
    """The record of a rank that exited without writing one (killed by a signal, or a native crash).

    ``collateral``: the launcher itself stopped it (torchrun sends SIGTERM to every other rank once one
    fails), so it is not the root cause."""
    if exitcode < 0:
        kind = signal_name if signal_name.startswith("SIG") else f"signal {-exitcode}"
        message = (f"killed by {kind} (pid {pid} on {host}) without a Python error: the out-of-memory killer, "
                   "a user, the scheduler or a crash in native code")
    else:
        kind = "ExitCode"
        message = f"exited with code {exitcode} (pid {pid} on {host}) without a Python error"
    record = {"rank": rank, "local_rank": None, "host": host, "pid": pid, "time": when,
              "type": kind, "message": message, "collateral": collateral,
              "origin_rank": None, "traceback": ""}
    record["path"] = str(write_record(directory, record))
    return record


def read_records(directory: str | os.PathLike, since: float = 0.0) -> list[dict]:
    """The records written at or after ``since`` (seconds since the epoch), by rank."""
    records = []
    for path in sorted(Path(directory).glob("rank-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if float(record.get("time", 0)) >= since:
            records.append({**record, "path": str(path)})
    return records


def root_cause(records: Sequence[dict]) -> Optional[dict]:
    """The first failure of its own (else the first collateral one); None without records."""
    if not records:
        return None
    own = [r for r in records if not r.get("collateral")]
    return min(own or records, key=lambda r: (float(r["time"]), int(r["rank"])))


def report_lines(records: Sequence[dict], prog: str) -> list[str]:
    """What a launcher prints last: the other ranks summarised, then ``<prog>: rank R failed: T: M``."""
    root = root_cause(records)
    if root is None:
        return []
    rank = root["origin_rank"] if root.get("origin_rank") is not None else root["rank"]
    others = [r for r in records if r is not root]
    lines = []
    if others:
        same = [r["rank"] for r in others if r.get("origin_rank") == rank]
        rest = [r for r in others if r.get("origin_rank") != rank]
        parts = [f"rank{'s' if len(same) > 1 else ''} {_ranks(same)} stopped with the same error"] if same else []
        parts += [f"rank {r['rank']} stopped too ({r['type']}: {one_line(r['message'])[:120]})" for r in rest[:4]]
        if len(rest) > 4:
            parts.append(f"{len(rest) - 4} more ranks stopped too")
        lines.append(f"{prog}: {'; '.join(parts)}; records and tracebacks in {Path(root['path']).parent}")
    lines.append(f"{prog}: rank {rank} failed: {root['type']}: {one_line(root['message'])}")
    return lines


def _ranks(ranks: Sequence[int]) -> str:
    ranks = sorted(ranks)
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
