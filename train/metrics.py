"""What a run reports: ``<run_dir>/metrics.jsonl``, a console progress line, wandb, a loss plot.

``MetricsWriter`` is created on every rank but only writes where ``enabled`` (rank 0 by convention).
Each ``log`` call appends one JSON line and fsyncs it, so a crash loses at most the line being
written; on resume the file is cut back to the resumed step, so a step that ran after the last
checkpoint and ran again after the restart appears once. Wandb runs offline unless configured
(``wandb.mode=online`` or ``WANDB_MODE``) and never stops training when it fails.

One line holds at least: step, loss, lr, grad_norm, tokens (real tokens of the step over all ranks),
tokens_total, tokens_per_s, tflops_per_s (model FLOPs per second per GPU, see qwen3vl.train.flops),
mfu (null without a known peak), skipped (cumulative counts by reason), step_time_s, time, plus any
extra keyword the loop passes (e.g. peak_memory_gib: one value per rank from
qwen3vl.train.flops.peak_memory_per_rank; the console shows the largest).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Optional, TextIO

from qwen3vl.train.flops import mfu
from qwen3vl.train.loss_plot import plot_loss

METRICS_FILE = "metrics.jsonl"
__all__ = ["MetricsWriter", "plot_loss", "read_metrics", "METRICS_FILE"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
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


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 world_size: int = 1, peak_tflops: Optional[float] = None, enabled: bool = True,
                 wandb_cfg: Any = None, config: Optional[dict] = None, label: str = "",
                 stream: TextIO = sys.stdout) -> None:
        """``start_step``: the step the run resumes after (0 for a fresh run); later lines are dropped."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.total_steps = total_steps
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.enabled = enabled
        self.label = label
        self.stream = stream
        self._recent_step_times: deque[float] = deque(maxlen=20)
        self.tokens_total = 0
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = self._truncate_after(start_step)
        self.tokens_total = int(kept[-1].get("tokens_total", 0)) if kept else 0
        self._wandb = _start_wandb(self.run_dir, wandb_cfg, config)

    def _truncate_after(self, step: int) -> list[dict]:
        kept = [r for r in read_metrics(self.run_dir) if int(r.get("step", 0)) <= step]
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
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._recent_step_times.append(step_time_s)
        print(self.progress_line(record), file=self.stream, flush=True)
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in record.items() if v is not None}, step=int(step))
            except Exception as err:  # noqa: BLE001 - reporting must never stop training
                warnings.warn(f"wandb.log failed, metrics.jsonl still has the step: {err}")
        return record

    def progress_line(self, record: dict) -> str:
        step = record["step"]
        pct = 100.0 * step / self.total_steps if self.total_steps else 0.0
        parts = [f"{self.label + ' ' if self.label else ''}step {step}/{self.total_steps} ({pct:.0f}%)",
                 f"loss {_fmt(record['loss'], '.4f')}", f"lr {record['lr']:.2e}",
                 f"gnorm {_fmt(record['grad_norm'], '.3f')}"]
        if record["tokens_per_s"] is not None:
            parts.append(f"{_si(record['tokens_per_s'])} tok/s")
        if record["tflops_per_s"] is not None:
            parts.append(f"{record['tflops_per_s']:.3g} TFLOP/s/GPU")
        if record["mfu"] is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if record.get("peak_memory_gib"):
            parts.append(f"mem {max(record['peak_memory_gib']):.1f} GiB")
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
            try:
                self._wandb.finish()
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"wandb.finish failed: {err}")
            self._wandb = None
        return plot_loss(self.run_dir) if plot and self.path.is_file() else None


def _start_wandb(run_dir: Path, wandb_cfg: Any, config: Optional[dict]) -> Any:
    """A wandb run (offline unless configured), or None when disabled or wandb is unusable."""
    mode = getattr(wandb_cfg, "mode", "disabled") if wandb_cfg is not None else "disabled"
    if mode == "offline":  # the default: WANDB_MODE in the environment counts as "configured"
        mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        id_file = run_dir / "wandb_run_id"  # the same wandb run continues across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                   tags=list(wandb_cfg.tags), dir=str(run_dir), mode=mode, id=run_id, resume="allow",
                   config=config)
        return wandb
    except Exception as err:  # noqa: BLE001 - reporting must never stop training
        warnings.warn(f"wandb is not available ({err}); metrics go to {run_dir / METRICS_FILE} only")
        return None


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
