"""torchrun, reporting failed ranks in the run directory instead of a page of its own stack frames.

    python -m qwen3vl.launch.elastic <torchrun arguments> -m qwen3vl.train.app ... run_dir=DIR ...

Exactly ``python -m torch.distributed.run`` (same arguments, same agent, same rendezvous), except when
a rank fails: torchrun's own traceback (~60 lines ending in ``ChildFailedError``) is not printed;
instead every failed rank that left no record of its own (killed by a signal such as SIGKILL or the
out-of-memory killer, or a native crash) gets one in ``<run_dir>/failures/`` (qwen3vl.train.
failure_record), which ``qwen3vl-launch`` (or the Slurm script) turns into its last line. Without a
``run_dir=`` argument it prints one line per failed rank. Exit code 1 on failure, like torchrun.
"""
from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from qwen3vl.train.failure_record import failures_dir, read_records, record_death


def run_dir_argument(argv: Sequence[str]) -> Optional[str]:
    """The ``run_dir=`` override given to the app (the launcher always passes an absolute one)."""
    found = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    return found[-1] if found else None


def note_failures(error: ChildFailedError, run_dir: Optional[str], started: float) -> list[str]:
    """Records the failed ranks that wrote no record since ``started``; returns a line per failed rank."""
    recorded = {r["rank"] for r in read_records(failures_dir(run_dir), since=started)} if run_dir else set()
    # torchrun stops the other ranks with SIGTERM once one fails; torch stamps failures in whole seconds, so
    # the time alone cannot tell the killed rank from the ranks stopped after it: they are collateral.
    stopped_by_torchrun = {rank for rank, f in error.failures.items() if f.exitcode == -signal.SIGTERM}
    own_failure = len(stopped_by_torchrun) < len(error.failures) or bool(recorded)
    lines = []
    for rank, failure in sorted(error.failures.items()):
        lines.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) exited with code "
                     f"{failure.exitcode}{' (' + failure.signal_name() + ')' if failure.exitcode < 0 else ''}")
        if run_dir and rank not in recorded:
            record_death(failures_dir(run_dir), rank, failure.exitcode, failure.signal_name(),
                         socket.gethostname(), failure.pid, float(failure.timestamp),
                         collateral=own_failure and rank in stopped_by_torchrun)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    run_dir, started = run_dir_argument(argv), time.time()
    try:
        run(args)
    except ChildFailedError as error:
        lines = note_failures(error, run_dir, started)
        if run_dir is None or not Path(run_dir).is_dir():
            for line in lines:
                print(f"torchrun: {line}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
