"""What a run reports: ``<run_dir>/metrics.jsonl``, a console progress line, wandb, a loss plot.

``MetricsWriter`` is created on every rank but only writes where ``enabled`` (rank 0 by convention).
Each ``log`` call appends one JSON line and fsyncs it, so a crash loses at most the line being
written; on resume the file is cut back to the resumed step, so a step that ran after the last
checkpoint and ran again after the restart appears once. Events (``{"event": name, "step": N, ...}``,
e.g. ``schedule_replanned``, and ``eval``: one per held-out set and evaluation, see ``eval``) are lines
of the same file; ``read_metrics`` returns the step lines and
``read_events`` the events.

One step line holds: step, loss, lr, grad_norm, tokens (real tokens of the step over all ranks),
tokens_total, tokens_per_s, tflops_per_s (model FLOPs per second per GPU, see qwen3vl.train.flops),
mfu (null without a known peak), skipped (cumulative counts by reason), step_time_s, time, plus what
the loop adds (token_loss, update_skipped, peak_memory_bytes and data_wait_s, each the largest over
the ranks). The first line of a run (and the first after each resume) also carries ``first_line``'s
fields, e.g. the datasets read.

The console line and wandb follow ``train.log_interval`` (every N-th step and the last one); metrics.jsonl
has every step. wandb (qwen3vl.train.wandb_run) gets every field of each step line it is given, at its step (the first
line's extra fields go to the run's config instead); it runs offline unless configured.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from qwen3vl.train.flops import mfu
from qwen3vl.train.loss_plot import plot_loss
from qwen3vl.train.wandb_run import start_wandb

METRICS_FILE = "metrics.jsonl"
__all__ = ["MetricsWriter", "plot_loss", "read_metrics", "read_events", "METRICS_FILE"]


def _read_lines(run_dir: str | os.PathLike) -> list[dict]:
    """Every complete line of ``<run_dir>/metrics.jsonl`` (a torn last line is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The step lines of ``<run_dir>/metrics.jsonl``, in order."""
    return [r for r in _read_lines(run_dir) if "event" not in r]


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """The event lines of ``<run_dir>/metrics.jsonl`` (e.g. ``schedule_replanned``), in order."""
    return [r for r in _read_lines(run_dir) if "event" in r]


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 horizon: Optional[int] = None, world_size: int = 1, peak_tflops: Optional[float] = None,
                 enabled: bool = True, wandb_cfg: Any = None, config: Optional[dict] = None, label: str = "",
                 stream: TextIO = sys.stdout, first_line: Optional[dict] = None, log_interval: int = 1) -> None:
        """``total_steps``: where this run stops; ``horizon``: the schedule's length, when it differs.
        ``start_step``: the step the run resumes after (0 for a fresh run); later lines are dropped.
        ``first_line``: fields added to the first line this writer logs (e.g. the datasets read), so the
        file's first line, and the first after each resume, says what the run trained on (in wandb
        they are part of the run's config, not of its history). ``log_interval``: the console line and wandb
        get every N-th step (and the last); metrics.jsonl gets every step."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.total_steps = total_steps
        self.horizon = horizon
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.enabled = enabled
        self.label = label
        self.stream = stream
        self.log_interval = max(1, int(log_interval))
        self._recent_step_times: deque[float] = deque(maxlen=20)
        self.tokens_total = 0
        self._first_line = dict(first_line or {})
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = self._truncate_after(start_step)
        steps = [r for r in kept if "event" not in r]
        self.tokens_total = int(steps[-1].get("tokens_total", 0)) if steps else 0
        self._wandb = start_wandb(self.run_dir, wandb_cfg, {**(config or {}), **self._first_line} or None,
                                  stream=stream)

    def _truncate_after(self, step: int) -> list[dict]:
        kept = [r for r in _read_lines(self.run_dir) if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return kept

    def log(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens: int, step_time_s: float,
            model_flops: Optional[float] = None, skipped: Optional[dict[str, int]] = None,
            **extra: Any) -> dict:
        """Record one step. ``model_flops``: the step's model FLOPs over all ranks (qwen3vl.train.flops)."""
        self.tokens_total += int(tokens)
        tflops = (model_flops / step_time_s / self.world_size / 1e12
                  if model_flops is not None and step_time_s > 0 else None)
        record = {
            "step": int(step), "loss": _finite_or_none(loss), "lr": float(lr),
            "grad_norm": _finite_or_none(grad_norm), "tokens": int(tokens), "tokens_total": self.tokens_total,
            "tokens_per_s": tokens / step_time_s if step_time_s > 0 else None,
            "tflops_per_s": tflops,
            "mfu": mfu(tflops * 1e12, self.peak_tflops) if tflops is not None else None,
            "skipped": dict(skipped or {}), "step_time_s": float(step_time_s), "time": time.time(),
            **extra,
        }
        header, self._first_line = self._first_line, {}
        record.update(header)
        if not self.enabled:
            return record
        self._append(record)
        self._recent_step_times.append(step_time_s)
        if step % self.log_interval and step != self.total_steps:
            return record
        print(self.progress_line(record), file=self.stream, flush=True)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in header}, step=int(step))
        return record

    def eval(self, step: int, results: Sequence[Any]) -> list[dict]:
        """Record one evaluation: an ``eval`` event per held-out set (``results``: objects with ``as_dict()``
        holding dataset, loss_token_mean, loss_sqrt, tokens, perplexity, as qwen3vl.train.evaluate's), wandb
        under ``eval/<dataset>/<field>``, and one console line."""
        if not self.enabled:
            return []
        # Non-finite values as null, like the step lines (strict JSON has no NaN).
        lines = [self.event("eval", step, **{k: _finite_or_none(v) if isinstance(v, float) else v
                                             for k, v in r.as_dict().items()}) for r in results]
        parts = [f"{r['dataset']} loss {_fmt(r['loss_token_mean'], '.4f')} (sqrt {_fmt(r['loss_sqrt'], '.4f')}, "
                 f"ppl {_fmt(r['perplexity'], '.4g')}, {r['tokens']} tokens)" for r in lines]
        print(f"{self.label + ' ' if self.label else ''}eval step {step} | " + " | ".join(parts), file=self.stream,
              flush=True)
        if self._wandb is not None:
            self._wandb.log({f"eval/{r['dataset']}/{k}": r[k] for r in lines
                             for k in ("loss_token_mean", "loss_sqrt", "perplexity", "tokens")}, step=int(step))
        return lines

    def event(self, name: str, step: int, **fields: Any) -> Optional[dict]:
        """Record a one-off event (``{"event": name, "step": step, ...}``) in metrics.jsonl."""
        if not self.enabled:
            return None
        record = {"event": name, "step": int(step), "time": time.time(), **fields}
        self._append(record)
        return record

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def progress_line(self, record: dict) -> str:
        step = record["step"]
        pct = 100.0 * step / self.total_steps if self.total_steps else 0.0
        of = f" of {self.horizon}" if self.horizon and self.horizon != self.total_steps else ""
        parts = [f"{self.label + ' ' if self.label else ''}step {step}/{self.total_steps}{of} ({pct:.0f}%)",
                 f"loss {_fmt(record['loss'], '.4f')}", f"lr {record['lr']:.2e}",
                 f"gnorm {_fmt(record['grad_norm'], '.3f')}"]
        if record["tokens_per_s"] is not None:
            parts.append(f"{_si(record['tokens_per_s'])} tok/s")
        if record["tflops_per_s"] is not None:
            parts.append(f"{record['tflops_per_s']:.3g} TFLOP/s/GPU")
        if record["mfu"] is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if record.get("peak_memory_bytes"):
            parts.append(f"mem {record['peak_memory_bytes'] / 2 ** 30:.2f} GiB")
        skipped = sum(record["skipped"].values())
        if skipped:
            parts.append(f"skipped {skipped}")
        parts.append(f"ETA {self.eta(step)}")
        return " | ".join(parts)

    def eta(self, step: int) -> str:
        """Remaining time from the mean of the last (up to 20) step times."""
        if not self._recent_step_times:
            return "?"
        remaining = max(0, self.total_steps - step) * sum(self._recent_step_times) / len(self._recent_step_times)
        hours, rest = divmod(int(round(remaining)), 3600)
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"

    def close(self, plot: bool = True) -> Optional[Path]:
        """Finish wandb and draw ``<run_dir>/loss.png``; returns the plot's path (None when disabled)."""
        if not self.enabled:
            return None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        return plot_loss(self.run_dir) if plot and self.path.is_file() else None


def _finite_or_none(x: float) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x: Optional[float], spec: str) -> str:
    return "nan" if x is None else format(x, spec)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
