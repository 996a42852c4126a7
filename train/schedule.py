"""The learning-rate schedule of a stage: its horizon is the stage's token budget, not where a run stops.

A stage is a token budget. Its schedule (warmup, then the decay to ``min_lr_ratio`` of each part's peak)
spans ``train.token_budget / train.global_batch_tokens`` steps, or ``schedule.total_steps`` when given.
``train.steps``, ``train.stop_at_step`` and ``train.stop_after_minutes`` only say where one invocation
stops, so running the same command again with a larger ``train.steps`` continues exactly as one longer
run would have.

The plan (horizon, warmup, decay style, per-part peak learning rates, final ratio) is written into every
checkpoint (``schedule.json``, next to ``config.yaml``). A resume whose config would change it is refused
before any rank starts, with a message naming the saved and the new values, unless
``schedule.on_resume=replan`` says the change is meant; the app then records a ``schedule_replanned``
event in metrics.jsonl and the new plan takes over from the resumed step.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

SCHEDULE_FILE = "schedule.json"
# Field of the plan -> the config key a user changes it with (for the messages).
_KEYS = {"total_steps": "schedule.total_steps (or train.token_budget / train.global_batch_tokens)",
         "warmup_steps": "schedule.warmup_steps / schedule.warmup_fraction", "decay_style": "schedule.decay_style",
         "peak_lr": "optim.lr", "min_lr_ratio": "schedule.min_lr_ratio",
         "wsd_decay_steps": "schedule.wsd_decay_fraction"}


@dataclass(frozen=True)
class SchedulePlan:
    total_steps: int  # the horizon: the decay ends here
    warmup_steps: int
    decay_style: str  # cosine, linear, wsd, constant
    peak_lr: dict[str, float]  # per part: vision, merger (and the DeepStack mergers), llm
    min_lr_ratio: float
    wsd_decay_steps: Optional[int] = None  # wsd only: the final decay phase

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulePlan":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def differences(self, new: "SchedulePlan") -> list[str]:
        """One 'field: saved X, new Y' per field that differs (self = saved)."""
        return [f"{_KEYS[name]}: saved {getattr(self, name)}, new {getattr(new, name)}"
                for name in self.__dataclass_fields__ if getattr(self, name) != getattr(new, name)]


def horizon(cfg) -> Optional[int]:
    """The schedule's length in steps: ``schedule.total_steps``, else the token budget over the batch."""
    if cfg.schedule.total_steps is not None:
        return cfg.schedule.total_steps
    if cfg.train.token_budget is None or cfg.train.global_batch_tokens < 1:
        return None
    return math.ceil(cfg.train.token_budget / cfg.train.global_batch_tokens)


def plan_of(cfg) -> SchedulePlan:
    """The plan a (validated) config asks for."""
    s = cfg.schedule
    total = horizon(cfg)
    warmup = s.warmup_steps if s.warmup_steps is not None else int(round(s.warmup_fraction * total))
    style = getattr(s.decay_style, "value", s.decay_style)
    return SchedulePlan(total_steps=total, warmup_steps=warmup, decay_style=style,
                        peak_lr={k: float(v) for k, v in asdict(cfg.optim.lr).items()},
                        min_lr_ratio=float(s.min_lr_ratio),
                        wsd_decay_steps=max(1, int(s.wsd_decay_fraction * total)) if style == "wsd" else None)


def build_scheduler(optimizer, plan: SchedulePlan, weight_decay: float):
    """megatron's OptimizerParamScheduler for ``plan``; per-part peaks come from the param groups'
    max_lr/min_lr (qwen3vl.train.freeze), the scheduler's own max_lr is the largest of them."""
    from megatron.core.optimizer_param_scheduler import (  # lazy: config checks (launcher) run without megatron
        OptimizerParamScheduler)

    max_lr = max(plan.peak_lr.values())
    wsd = dict(wsd_decay_steps=plan.wsd_decay_steps, lr_wsd_decay_style="linear") if plan.decay_style == "wsd" else {}
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=max_lr, min_lr=max_lr * plan.min_lr_ratio, lr_warmup_steps=plan.warmup_steps,
        lr_decay_steps=max(plan.total_steps, plan.warmup_steps + 1),
        lr_decay_style={"wsd": "WSD"}.get(plan.decay_style, plan.decay_style),
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=max(plan.total_steps, 1), wd_incr_style="constant",
        # The plan is checked against the checkpoint's before anything loads (resume_problems); with
        # schedule.on_resume=replan the new plan must win, so the checkpoint only restores the step count.
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True, **wsd)


def plan_file_text(plan: SchedulePlan) -> str:
    return json.dumps(plan.to_dict(), indent=1, sort_keys=True) + "\n"


def saved_plan(checkpoint_dir: Path) -> Optional[SchedulePlan]:
    """The plan saved in one checkpoint directory (None for a checkpoint written without one)."""
    path = Path(checkpoint_dir) / SCHEDULE_FILE
    return SchedulePlan.from_dict(json.loads(path.read_text())) if path.is_file() else None


def resume_changes(cfg, checkpoint_dir: Optional[Path]) -> tuple[Optional[SchedulePlan], list[str]]:
    """(saved plan, what ``cfg`` would change in it) for a resume from ``checkpoint_dir``."""
    saved = saved_plan(checkpoint_dir) if checkpoint_dir is not None else None
    return saved, (saved.differences(plan_of(cfg)) if saved is not None else [])


def resume_problems(cfg) -> list[str]:
    """Config problems of resuming ``cfg.run_dir`` under ``cfg`` (empty without a checkpoint or with replan)."""
    from qwen3vl.train.checkpoint import CheckpointError, find_latest  # lazy: megatron; config checks run without it

    try:
        latest = find_latest(cfg.run_dir)
    except CheckpointError as err:
        return [f"run_dir={cfg.run_dir}: {err}"]
    _, changes = resume_changes(cfg, latest)
    if not changes or getattr(cfg.schedule.on_resume, "value", cfg.schedule.on_resume) == "replan":
        return []
    return [f"run_dir={cfg.run_dir} resumes from {latest.name}, whose schedule this config would change ("
            f"{'; '.join(changes)}): a stage's schedule is fixed when it starts, and train.steps only says where "
            "a run stops. Restore the saved values, or set schedule.on_resume=replan to continue from the "
            "resumed step under the new schedule (recorded in metrics.jsonl), or use another run_dir"]
