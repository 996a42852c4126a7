"""wandb for a training run: offline by default, one wandb run across resumes, every metrics line logged.

``wandb.mode``: ``offline`` (the default; ``WANDB_MODE`` in the environment wins over it), ``online``
or ``disabled``. An offline run is written under ``<run_dir>/wandb/offline-run-<time>-<id>/`` and
can be uploaded later with ``wandb sync``; ``wandb leet inspect --json <that dir>`` reads it here.
The run id is kept in ``<run_dir>/wandb_run_id``, so every invocation of a stage (resumes, requeued
Slurm jobs) logs into the same wandb run. Each metrics.jsonl line goes to wandb as it is, at its step
(nested fields such as ``skipped`` become ``skipped.<reason>``, nulls stay null).

When wandb cannot start, an offline run says so once on the console and training goes on (metrics.jsonl
has everything); ``online`` was asked for explicitly, so there it is an error (``WandbError``) that
names the fixes. wandb's own console output is switched off: the progress line is the run's console.
"""
from __future__ import annotations

import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

RUN_ID_FILE = "wandb_run_id"
MODES = ("offline", "online", "disabled")


class WandbError(RuntimeError):
    """``wandb.mode=online`` and wandb cannot start."""


def resolve_mode(wandb_cfg: Any) -> str:
    """The mode this run uses: the config's, except that ``WANDB_MODE`` overrides the offline default."""
    mode = getattr(wandb_cfg, "mode", "disabled") if wandb_cfg is not None else "disabled"
    if mode == "offline":
        mode = os.environ.get("WANDB_MODE", "offline")
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def run_id(run_dir: Path) -> str:
    """The run's wandb id, created on the first start and reused on every resume."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(new + "\n")
    return new


class WandbRun:
    """A started wandb run; a failure while logging is reported once and never stops training."""

    def __init__(self, run: Any, stream: TextIO) -> None:
        self.run = run
        self.stream = stream
        self._failed = False

    def log(self, record: dict, step: int) -> None:
        if self._failed:
            return
        try:
            self.run.log(record, step=step)
        except Exception as err:  # noqa: BLE001 - reporting must never stop training
            self._failed = True
            print(f"wandb: logging failed at step {step} ({err}); later steps go to metrics.jsonl only",
                  file=self.stream, flush=True)

    def finish(self) -> None:
        try:
            self.run.finish()
        except Exception as err:  # noqa: BLE001
            print(f"wandb: finishing the run failed ({err}); metrics.jsonl has every step", file=self.stream,
                  flush=True)


def start_wandb(run_dir: Path, wandb_cfg: Any, config: Optional[dict] = None,
                stream: TextIO = sys.stdout) -> Optional[WandbRun]:
    """The run's wandb run, or None when disabled (or unusable offline, said once on ``stream``)."""
    mode = resolve_mode(wandb_cfg)
    if mode == "disabled":
        return None
    if mode not in MODES:
        raise WandbError(f"wandb.mode={mode!r} (or WANDB_MODE): use offline, online or disabled")
    try:
        import wandb  # lazy: importing wandb costs a second and a disabled run never needs it

        run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or run_dir.name,
                         tags=list(wandb_cfg.tags), dir=str(run_dir), mode=mode, id=run_id(run_dir),
                         resume="allow", config=config,
                         settings=wandb.Settings(silent=True, console="off"))
    except Exception as err:  # noqa: BLE001 - any failure of an optional reporter
        if mode == "online":
            raise WandbError(
                f"wandb.mode=online but wandb could not start: {err}. Check the network and the API key "
                "(wandb login, or WANDB_API_KEY), or run with wandb.mode=offline and upload later with "
                "wandb sync, or wandb.mode=disabled") from err
        print(f"wandb: the offline run could not start ({type(err).__name__}: {err}); this run is NOT recorded "
              f"in wandb, {run_dir / 'metrics.jsonl'} has every step (wandb.mode=disabled silences this)",
              file=stream, flush=True)
        return None
    return WandbRun(run, stream)
