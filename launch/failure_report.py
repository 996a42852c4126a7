"""The last lines of a failed run: which rank failed first and why, from ``<run_dir>/failures/``.

    python -m qwen3vl.launch.failure_report RUN_DIR SINCE_EPOCH_SECONDS [EXIT_CODE]

``qwen3vl-launch`` prints them after torchrun exits; the Slurm script runs this module after ``srun``,
so the job's output ends the same way. See qwen3vl.train.failure_record for the records.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from qwen3vl.train.failure_record import failures_dir, read_records, report_lines


def report_failure(run_dir: str, since: float, code: int, prog: str = "qwen3vl-launch") -> None:
    """Prints why the run failed: the other ranks summarised, then ``<prog>: rank R failed: T: M``."""
    lines = report_lines(read_records(failures_dir(run_dir), since=since), prog)
    if not lines:
        lines = [f"{prog}: the run failed (exit code {code}) and no rank recorded why; see the output above"]
    sys.stdout.flush()
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    code = int(args[2]) if len(args) == 3 else 1
    report_failure(args[0], float(args[1]), code)
    return code


if __name__ == "__main__":
    sys.exit(main())
