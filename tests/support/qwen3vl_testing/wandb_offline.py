"""Read an offline wandb run without network: its history and summary, through wandb's own reader.

wandb 0.31 keeps an offline run as a transaction log, ``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``
(a resumed run adds one such folder per invocation, with the same id); ``wandb leet inspect --json``
prints its records, ``--summary --json`` the run's summary. (Offline, 0.31 writes no
``files/wandb-summary.json``: the summary is a record of the log, uploaded by ``wandb sync``.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline run folders under ``<run_dir>/wandb``, oldest first (the folder's name starts with its start
    time; a second invocation in the same second adds ``-1``, which sorts after)."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def run_id(folder: Path) -> str:
    """The id of the run an offline folder belongs to, from its ``run-<id>.wandb`` log. (Not from the folder's
    name: two invocations started in the same second get ``...-<id>`` and ``...-<id>-1``.)"""
    logs = [p.name for p in Path(folder).glob("run-*.wandb")]
    assert len(logs) == 1, f"{folder}: expected one run-<id>.wandb, found {logs}"
    return logs[0][len("run-"):-len(".wandb")]


def _inspect(folder: Path, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", *flags, str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def history(folder: Path) -> dict[int, dict]:
    """step -> the logged row (nested fields flattened as ``a.b``, as wandb stores them)."""
    rows = {}
    for line in _inspect(folder, "--json").splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            rows[int(record["history"]["step"]["num"])] = record["history"]["item"]
    return rows


def summary(folder: Path) -> dict:
    """The run's state, id, config and summary (``wandb leet inspect --summary --json``)."""
    return json.loads(_inspect(folder, "--summary", "--json"))


def flatten(record: dict, prefix: str = "") -> dict:
    """A metrics.jsonl record as wandb stores it: nested dicts as dotted keys."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
