"""Everything about a training config that can be checked before any process group exists.

``validate(cfg, world_size)`` gathers every problem (model preset and overrides, parallel layout via
``qwen3vl.parallel.layout``, sequence length against context parallelism, batch arithmetic, token
budget, schedule, optimizer, freezing, shards, init_from) and raises one ``ConfigError`` whose lines
name the field and say what to change. It never touches torch.distributed.
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from qwen3vl.model.presets import get_preset
from qwen3vl.parallel.layout import ALL_GATHER_CP_COMM_TYPES, CP_COMM_TYPES
from qwen3vl.train.config import (RECOMPUTE_MODULES, TRAINABLE_PARTS, ConfigError, Qwen3VLTrainConfig, RecomputeCfg,
                                  run_shape)
from qwen3vl.train.schedule import horizon, resume_problems

DEMO_SHARDS = "demo"
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


def validate(cfg: Qwen3VLTrainConfig, world_size: int, *, check_paths: bool = True) -> Qwen3VLTrainConfig:
    """Return ``cfg`` with ``train.steps`` filled in, or raise ``ConfigError`` listing every problem.

    ``check_paths=False`` skips the file-system checks (shards, init_from, the schedule saved in
    run_dir's checkpoint), e.g. to validate a Slurm job on a login node that does not mount the data.
    """
    problems: list[str] = []
    if world_size < 1:
        problems.append(f"world size {world_size}: run at least one rank (--nproc)")
    model = _model_problems(cfg, problems)
    problems += _train_problems(cfg)
    problems += _sequence_problems(cfg)
    if model is not None and world_size >= 1:
        # The batch arithmetic needs dp, so it is checked once the layout is valid.
        problems += _layout_problems(cfg, model, world_size) or _batch_problems(cfg, world_size)
    problems += _schedule_problems(cfg)
    problems += _optim_problems(cfg)
    problems += _data_problems(cfg, check_paths)
    problems += _eval_problems(cfg, check_paths)
    if check_paths and cfg.init_from and not Path(cfg.init_from).exists():
        problems.append(f"init_from={cfg.init_from} does not exist: give the run directory or checkpoint "
                        "directory of the previous stage, or init_from=null")
    if check_paths and not problems:
        problems += resume_problems(cfg)
    if problems:
        raise ConfigError(problems)
    if cfg.train.steps is None:
        cfg.train.steps = run_shape(cfg, world_size).steps
    return cfg


# --- model ---------------------------------------------------------------------------------------------
def build_model_config(cfg: Qwen3VLTrainConfig) -> Any:
    """The architecture (``qwen3vl.model.config.Qwen3VLConfig``): the preset with ``model.overrides``."""
    model = get_preset(cfg.model.preset)
    for dotted, value in _flatten(cfg.model.overrides):
        model = _override(model, dotted.split("."), value, dotted)
    return model.validate()


def _flatten(overrides: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{"text": {"num_layers": 8}} and {"text.num_layers": 8} both give [("text.num_layers", 8)]."""
    flat = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat += _flatten(value, f"{prefix}{key}.")
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


def _override(obj: Any, path: list[str], value: Any, dotted: str) -> Any:
    names = {f.name for f in fields(obj)}
    if path[0] not in names:
        raise KeyError(f"model.overrides key {dotted!r}: {type(obj).__name__} has no field {path[0]!r} "
                       f"(fields: {', '.join(sorted(names))})")
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not is_dataclass(current):
            raise KeyError(f"model.overrides key {dotted!r}: {path[0]!r} has no sub-fields")
        return replace(obj, **{path[0]: _override(current, path[1:], value, dotted)})
    if isinstance(current, tuple):
        value = tuple(value)
    return replace(obj, **{path[0]: value})


def _model_problems(cfg: Qwen3VLTrainConfig, problems: list[str]) -> Any:
    try:
        return build_model_config(cfg)
    except KeyError as err:
        problems.append(f"model: {err.args[0]}")
    except ValueError as err:  # the model's own ConfigError
        problems.append(f"model ({cfg.model.preset} with overrides {dict(cfg.model.overrides)}): {err}")
    return None


# --- layout and sizes ----------------------------------------------------------------------------------
def _layout_problems(cfg: Qwen3VLTrainConfig, model: Any, world_size: int) -> list[str]:
    p = cfg.parallel
    found = [f"parallel: {msg}" for msg in p.layout().problems(world_size, prefix="parallel.",
                                                                 **model.layout_dims())]
    if p.cp_comm_type not in CP_COMM_TYPES:
        found.append(f"parallel.cp_comm_type={p.cp_comm_type!r}: use {', '.join(CP_COMM_TYPES)}")
    elif p.cp > 1 and p.cp_comm_type not in ALL_GATHER_CP_COMM_TYPES and not _transformer_engine_available():
        found.append(f"parallel.cp_comm_type={p.cp_comm_type!r} needs transformer-engine's attention, which is "
                     f"not installed here (the built-in attention all-gathers K/V): use "
                     f"{' or '.join(ALL_GATHER_CP_COMM_TYPES)}, or install transformer-engine")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        found.append(f"parallel.ddp_bucket_size={p.ddp_bucket_size}: give parameters per bucket (>= 1) or null "
                     "for megatron's default")
    return found


def _transformer_engine_available() -> bool:
    from qwen3vl.model.attention import transformer_engine_available  # lazy: megatron; the launcher checks without it

    return transformer_engine_available()


def _sequence_problems(cfg: Qwen3VLTrainConfig) -> list[str]:
    p, seq = cfg.parallel, cfg.train.seq_length
    if seq < 2:
        return [f"train.seq_length={seq} must be at least 2"]
    if p.cp < 1 or p.tp < 1:
        return []  # reported with the layout
    return p.layout().sequence_problems(seq, prefix="parallel.", seq_field="train.seq_length")


def _batch_problems(cfg: Qwen3VLTrainConfig, world_size: int) -> list[str]:
    t, layout = cfg.train, cfg.parallel.layout()
    if t.global_batch_tokens < 1 or t.micro_batch_rows < 1 or t.seq_length < 2:
        return []  # reported by _train_problems / _sequence_problems
    dp = layout.dp(world_size)
    if t.global_batch_tokens % t.seq_length:
        rows = max(1, t.global_batch_tokens // t.seq_length)
        return [f"train.global_batch_tokens={t.global_batch_tokens} is not a whole number of "
                f"train.seq_length={t.seq_length} rows: use train.global_batch_tokens="
                f"{rows * t.seq_length}"]
    rows = t.global_batch_tokens // t.seq_length
    per_step = dp * t.micro_batch_rows
    if rows % per_step:
        fix = max(1, rows // per_step) * per_step
        return [f"train.global_batch_tokens={t.global_batch_tokens} gives {rows} rows of {t.seq_length} "
                f"tokens, not divisible by dp·train.micro_batch_rows = {dp}·{t.micro_batch_rows} = "
                f"{per_step}: use train.global_batch_tokens={fix * t.seq_length} (a multiple of "
                f"{per_step * t.seq_length}) or change the number of ranks"]
    fix = (f"make train.global_batch_tokens a multiple of "
           f"{layout.microbatch_multiple * per_step * t.seq_length}")
    return layout.microbatch_problems(rows // per_step, prefix="parallel.", fix=fix)


def _train_problems(cfg: Qwen3VLTrainConfig) -> list[str]:
    t, found = cfg.train, []
    if t.steps is not None and t.steps < 1:
        found.append(f"train.steps={t.steps} must be at least 1")
    if t.stop_at_step is not None and t.stop_at_step < 1:
        found.append(f"train.stop_at_step={t.stop_at_step} must be at least 1 (or null)")
    if t.stop_after_minutes is not None and t.stop_after_minutes <= 0:
        found.append(f"train.stop_after_minutes={t.stop_after_minutes} must be positive (or null)")
    if t.token_budget is not None and t.token_budget <= 0:
        found.append(f"train.token_budget={t.token_budget} must be positive")
    for name in ("global_batch_tokens", "micro_batch_rows", "save_interval", "keep_last_k", "log_interval",
                 "max_consecutive_nan"):
        if getattr(t, name) < 1:
            found.append(f"train.{name}={getattr(t, name)} must be at least 1")
    if not 0.0 <= t.loss_exponent <= 1.0:
        found.append(f"train.loss_exponent={t.loss_exponent} must be in [0, 1] (0 token mean, 0.5 the "
                     "square-root rule, 1 sample mean)")
    unknown = [p for p in t.trainable if p != "all" and p not in TRAINABLE_PARTS]
    if unknown or not t.trainable:
        found.append(f"train.trainable={list(t.trainable)}: use [all] or a list of "
                     f"{', '.join(TRAINABLE_PARTS)}")
    r = t.recompute
    if r.granularity not in (None, "selective", "full"):
        found.append(f"train.recompute.granularity={r.granularity!r}: use null, selective or full")
    if r.method not in ("uniform", "block"):
        found.append(f"train.recompute.method={r.method!r}: use uniform or block")
    if r.num_layers < 1:
        found.append(f"train.recompute.num_layers={r.num_layers} must be at least 1")
    unknown = [m for m in r.modules if m not in RECOMPUTE_MODULES]
    if unknown or not r.modules:
        found.append(f"train.recompute.modules={list(r.modules)}: use a non-empty list of "
                     f"{', '.join(RECOMPUTE_MODULES)} (with granularity selective)")
    elif r.granularity != "selective" and list(r.modules) != RecomputeCfg().modules:
        found.append(f"train.recompute.modules={list(r.modules)} takes effect only with "
                     f"train.recompute.granularity=selective (it is {r.granularity})")
    return found


# --- optimisation ------------------------------------------------------------------------------------
def _schedule_problems(cfg: Qwen3VLTrainConfig) -> list[str]:
    s, found = cfg.schedule, []
    if s.warmup_steps is not None and s.warmup_steps < 0:
        found.append(f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
    if not 0.0 <= s.warmup_fraction < 1.0:
        found.append(f"schedule.warmup_fraction={s.warmup_fraction} must be in [0, 1)")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        found.append(f"schedule.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    if not 0.0 < s.wsd_decay_fraction <= 1.0:
        found.append(f"schedule.wsd_decay_fraction={s.wsd_decay_fraction} must be in (0, 1]")
    if s.total_steps is not None and s.total_steps < 1:
        found.append(f"schedule.total_steps={s.total_steps} must be at least 1 (or null: the token budget)")
        return found
    if cfg.train.token_budget is not None and cfg.train.token_budget <= 0:
        return found  # reported by _train_problems
    total = horizon(cfg)
    if total is None:
        return found + ["the schedule has no horizon: set train.token_budget=<tokens the stage trains on> "
                        "(the schedule spans token_budget / global_batch_tokens steps) or schedule.total_steps=N; "
                        "train.steps only says where a run stops"]
    if s.warmup_steps is not None and s.warmup_steps >= total:
        found.append(f"schedule.warmup_steps={s.warmup_steps} leaves no decay in the schedule's {total} steps: "
                     "use fewer warmup steps or schedule.warmup_fraction")
    if cfg.train.steps is not None and cfg.train.steps > total:
        found.append(f"train.steps={cfg.train.steps} runs past the end of the schedule ({total} steps = "
                     f"{_horizon_source(cfg)}): raise train.token_budget or schedule.total_steps for a longer "
                     "stage, or leave train.steps out to stop at the end")
    return found


def _horizon_source(cfg: Qwen3VLTrainConfig) -> str:
    if cfg.schedule.total_steps is not None:
        return "schedule.total_steps"
    return (f"train.token_budget={cfg.train.token_budget:g} / train.global_batch_tokens="
            f"{cfg.train.global_batch_tokens}")


def _optim_problems(cfg: Qwen3VLTrainConfig) -> list[str]:
    o, found = cfg.optim, []
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            found.append(f"optim.{name}={getattr(o, name)} must be in [0, 1)")
    if o.eps <= 0:
        found.append(f"optim.eps={o.eps} must be positive")
    if o.weight_decay < 0:
        found.append(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if o.clip_grad < 0:
        found.append(f"optim.clip_grad={o.clip_grad}: use a positive norm, or 0 to disable clipping")
    lr_of_part = {"vision": "vision", "merger": "merger", "deepstack_merger": "merger", "llm": "llm"}
    trainable = TRAINABLE_PARTS if "all" in cfg.train.trainable else cfg.train.trainable
    for part in trainable:
        key = lr_of_part.get(part)
        if key and getattr(o.lr, key) <= 0:
            found.append(f"optim.lr.{key}={getattr(o.lr, key)} but {part} is trainable (train.trainable="
                         f"{list(cfg.train.trainable)}): give it a positive lr or freeze it")
    return found


# --- data --------------------------------------------------------------------------------------------
def _data_problems(cfg: Qwen3VLTrainConfig, check_paths: bool) -> list[str]:
    from qwen3vl.data.dataset_errors import ON_EMPTY_DATASET  # lazy: webdataset imports torch (launcher checks)

    d, found = cfg.data, []
    if not d.datasets:
        return ["data.datasets is empty: pick a mix with data=<name> (see recipes/data/) or data=demo"]
    names = [ds.name for ds in d.datasets]
    if len(set(names)) != len(names):
        found.append(f"data.datasets names {names} repeat: give each dataset its own name")
    for i, ds in enumerate(d.datasets):
        if ds.weight <= 0:
            found.append(f"data.datasets[{i}] ({ds.name}) weight={ds.weight} must be positive (remove the "
                         "dataset to leave it out)")
        if check_paths and ds.shards != DEMO_SHARDS:
            found += _shard_problems(i, ds.name, ds.shards)
    for name in ("shuffle_buffer", "pack_buffer", "max_consecutive_failures"):
        if getattr(d, name) < 1:
            found.append(f"data.{name}={getattr(d, name)} must be at least 1")
    if d.num_workers < 0:
        found.append(f"data.num_workers={d.num_workers} must be >= 0")
    if d.on_empty_dataset not in ON_EMPTY_DATASET:
        found.append(f"data.on_empty_dataset={d.on_empty_dataset!r}: use stop (the run stops, naming the "
                     "dataset) or drop (the dataset leaves the mixture, the others renormalise)")
    found += _processing_problems(cfg)
    return found


def _eval_problems(cfg: Qwen3VLTrainConfig, check_paths: bool) -> list[str]:
    e, found = cfg.eval, []
    if e.interval < 0:
        found.append(f"eval.interval={e.interval}: use 0 (no periodic evaluation) or a positive number of steps")
    if e.interval > 0 and not e.datasets:
        found.append(f"eval.interval={e.interval} but eval.datasets is empty: name the held-out sets "
                     "(eval.datasets=[{name: ..., shards: ...}], shards: demo for the demo's) or set eval.interval=0")
    for name in ("samples", "tokens"):
        if getattr(e, name) is not None and getattr(e, name) < 1:
            found.append(f"eval.{name}={getattr(e, name)} must be at least 1 (or null)")
    if e.samples is not None and e.tokens is not None:
        found.append(f"eval.samples={e.samples} and eval.tokens={e.tokens} both limit the held-out pass: set "
                     "one of them to null")
    names = [d.name for d in e.datasets]
    if len(set(names)) != len(names):
        found.append(f"eval.datasets names {names} repeat: give each held-out set its own name (it names its "
                     "metrics, eval/<name>/...)")
    for i, d in enumerate(e.datasets):
        if check_paths and d.shards != DEMO_SHARDS:
            found += _shard_problems(i, d.name, d.shards, section="eval.datasets")
    return found


def _shard_problems(index: int, name: str, shards: str, section: str = "data.datasets") -> list[str]:
    from qwen3vl.data.shards import expand_shards, is_local  # lazy: webdataset imports torch (launcher checks)

    where = f"{section}[{index}] ({name}) shards={shards}"
    try:
        urls = expand_shards(shards)
    except (FileNotFoundError, ValueError) as err:
        return [f"{where}: {err}"]
    missing = [u for u in urls if is_local(u) and not u.startswith(_REMOTE_PREFIXES)
               and not Path(u.removeprefix("file:")).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more of {len(urls)}" if len(missing) > 1 else ""
        return [f"{where}: shard {missing[0]} does not exist{more}: fix the path or brace pattern, or build "
                "the shards first (qwen3vl-data build ...)"]
    return []


def _processing_problems(cfg: Qwen3VLTrainConfig) -> list[str]:
    from qwen3vl.data.processing_config import ProcessingConfig  # lazy: imports torch (launcher checks)

    known = {f.name for f in fields(ProcessingConfig)}
    unknown = sorted(set(cfg.data.processing) - known)
    if unknown:
        return [f"data.processing has unknown keys {unknown}: use fields of ProcessingConfig "
                f"({', '.join(sorted(known - {'seq_length'}))})"]
    if "seq_length" in cfg.data.processing:
        return ["data.processing.seq_length is set by train.seq_length: remove it"]
    try:
        ProcessingConfig(seq_length=cfg.train.seq_length, **cfg.data.processing).validate()
    except (TypeError, ValueError) as err:
        return [f"data.processing: {err}"]
    return []
