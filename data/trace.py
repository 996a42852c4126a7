"""The data trace: which samples a run trained on, and a check that each epoch saw every sample once.

With ``data.trace=true`` every data-parallel replica writes ``<run_dir>/data_trace/rank-<R>.jsonl``
(R: the global rank of the replica's writer), one line per packed row it trained on:

    {"step": 12, "microbatch": 0, "samples": [{"id": "<shard>:<key>", "dataset": "caption", "epoch": 0,
                                               "tokens": 298, "chunk": 0}, ...]}

(``chunk`` numbers the pieces of a text document longer than a row). Rows are those of the step as
trained, after the cost balance across ranks. A line costs a few hundred bytes per row and one write
per step, flushed so that a crash loses nothing. ``datasets.json`` next to them lists each dataset's
shards. On resume, lines of steps after the checkpoint (trained, then lost with the crash) are removed
first, so the trace says what the model's state has seen.

``qwen3vl-data trace-summary RUN_DIR`` reads the shards again and reports per dataset and epoch how
many samples were seen once, twice, more often, or never.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from qwen3vl.data.shards import is_local, read_shard, split_member_name

TRACE_DIR = "data_trace"
DATASETS_FILE = "datasets.json"


def trace_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / TRACE_DIR


def write_datasets(run_dir: str | os.PathLike, datasets: dict[str, list[str]]) -> None:
    """``datasets``: name -> its shard addresses (written once, by one rank)."""
    path = trace_dir(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / DATASETS_FILE).write_text(json.dumps(datasets, indent=1))


def truncate_after(run_dir: str | os.PathLike, step: int) -> None:
    """Drops the lines of steps after ``step`` from every rank's file (call on one rank, before writers open)."""
    for path in sorted(trace_dir(run_dir).glob("rank-*.jsonl")):
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)


class TraceWriter:
    """Appends one line per trained row to ``rank-<rank>.jsonl``."""

    def __init__(self, run_dir: str | os.PathLike, rank: int):
        path = trace_dir(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        self._file = open(path / f"rank-{rank}.jsonl", "a", encoding="utf-8")

    def write(self, step: int, rows: Sequence) -> None:
        lines = [json.dumps({"step": step, "microbatch": m, "samples": [o.as_dict() for o in row.samples]})
                 for m, row in enumerate(rows)]
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def shard_keys(url: str) -> list[str]:
    """The sample keys of a shard in order: local tars by their headers only (seeking past the data)."""
    if not is_local(url):
        return [r.key for r in read_shard(url)]
    keys: list[str] = []
    try:
        with tarfile.open(url[5:] if url.startswith("file:") else url, mode="r:*") as tar:
            for info in tar:
                key, suffix = split_member_name(info.name)
                if info.isreg() and suffix and not key.startswith("__") and (not keys or keys[-1] != key):
                    keys.append(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # what was listed before the damage is what the loader could read too
    return keys


def summarize(run_dir: str | os.PathLike) -> dict:
    """Per dataset and epoch: samples in the shards, and how many were seen once, twice, more, never."""
    directory = trace_dir(run_dir)
    if not (directory / DATASETS_FILE).is_file():
        raise FileNotFoundError(f"{directory / DATASETS_FILE} not found: was the run started with data.trace=true?")
    datasets = json.loads((directory / DATASETS_FILE).read_text())
    seen: dict[tuple[str, int], Counter] = defaultdict(Counter)
    rows = 0
    for path in sorted(directory.glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows += 1
                for sample in json.loads(line)["samples"]:
                    if sample.get("chunk", 0) == 0:  # a long document counts once, by its first piece
                        seen[sample["dataset"], sample["epoch"]][sample["id"]] += 1
    report: dict = {"rows": rows, "datasets": {}}
    for name, urls in datasets.items():
        ids = {f"{url}:{key}" for url in urls for key in shard_keys(url)}
        epochs = sorted(e for d, e in seen if d == name)
        per_epoch = {}
        for epoch in epochs:
            counts = seen[name, epoch]
            times = Counter(counts[i] for i in ids)
            per_epoch[str(epoch)] = {"samples": len(ids), "once": times[1], "twice": times[2],
                                     "more": sum(n for k, n in times.items() if k > 2), "never": times[0],
                                     "not_in_shards": len(set(counts) - ids)}
        report["datasets"][name] = per_epoch
    return report


def format_summary(report: dict) -> str:
    lines = [f"{report['rows']} rows traced"]
    for name, epochs in report["datasets"].items():
        for epoch, c in epochs.items():
            extra = f", {c['not_in_shards']} not in the shards" if c["not_in_shards"] else ""
            lines.append(f"{name:16s} epoch {epoch:>3s}: {c['samples']} samples, once {c['once']}, twice {c['twice']}, "
                         f"more {c['more']}, never {c['never']}{extra}")
        if not epochs:
            lines.append(f"{name:16s} no sample traced")
    return "\n".join(lines)
