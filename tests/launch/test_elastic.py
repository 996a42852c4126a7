"""qwen3vl.launch.elastic: the records it writes for ranks that died without a Python error."""
from __future__ import annotations

import signal

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from qwen3vl.launch.elastic import note_failures
from qwen3vl.train.failure_record import failures_dir, read_records, report_lines


def _failure(local_rank: int, exitcode: int, when: float) -> ProcessFailure:
    failure = ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file="")
    failure.timestamp = when  # torch stamps whole seconds: both ranks carry the same time
    return failure


def test_the_killed_rank_is_named_not_the_ranks_torchrun_stopped_after_it(tmp_path):
    # Rank 1 is SIGKILLed; torchrun then SIGTERMs rank 0 within the same second. Rank 0 sorts first by
    # (time, rank), so without the collateral mark the report blames it.
    error = ChildFailedError("app", {0: _failure(0, -signal.SIGTERM, 100.0), 1: _failure(1, -signal.SIGKILL, 100.0)})
    note_failures(error, str(tmp_path), started=0.0)
    last = report_lines(read_records(failures_dir(tmp_path)), "qwen3vl-launch")[-1]
    assert last.startswith("qwen3vl-launch: rank 1 failed: SIGKILL: killed by SIGKILL"), last


def test_a_job_the_scheduler_terminated_names_its_first_rank(tmp_path):
    # Every rank got SIGTERM (scancel, a node drain): none is collateral, the earliest is reported.
    error = ChildFailedError("app", {0: _failure(0, -signal.SIGTERM, 101.0), 1: _failure(1, -signal.SIGTERM, 100.0)})
    note_failures(error, str(tmp_path), started=0.0)
    records = read_records(failures_dir(tmp_path))
    assert not any(r["collateral"] for r in records)
    assert report_lines(records, "qwen3vl-launch")[-1].startswith("qwen3vl-launch: rank 1 failed: SIGTERM")
