"""Checkpoints with megatron dist_checkpointing: atomic commit, retention, exact resume, resharding.

Layout of a run directory::

    <run_dir>/checkpoints/iter_0000100/   one megatron dist checkpoint (model, distributed optimizer,
                                          scheduler, counters, per-rank RNG, per-DP-rank loader state)
                                          + config.yaml (the resolved run config)
                                          + model_config.json (the architecture, read by qwen3vl-convert)
    <run_dir>/checkpoints/latest          the tracker: the name of the last *committed* checkpoint

Commit protocol: every rank writes its shards, a barrier proves all of them finished, and only then
rank 0 replaces the tracker (temp file + fsync + os.replace); an asynchronous save
(qwen3vl.train.checkpoint_async) runs the same commit once its background writers are all done. A crash anywhere before that leaves the
previous checkpoint as latest; directories newer than the tracker are partial and are removed before
they are reused. Retention keeps the last k committed checkpoints and never deletes the latest.

Resharding: model tensors and the optimizer state load under any TP/PP/EP/DP layout. The optimizer
state is stored in megatron's 'fully_reshardable' layout (one tensor of the parameter's shape per Adam
state) but written and read in place by every rank (qwen3vl.train.optimizer_shards): a save never
gathers the optimizer on any rank, so its host memory is this rank's ZeRO-1 shard. RNG states (one per
global rank) only mean something under the same layout: with a different one they are not restored, and
a warning says so. Loader states (one per DP rank) are restored as they are under the same layout; under
a different one every rank gets all of them, which the loader re-partitions over the new data-parallel
ranks (qwen3vl/data/elastic.py).
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed.data_parallel_base import _BaseDataParallel
from megatron.core.transformer.module import Float16Module

from qwen3vl.model.interop.mcore_checkpoint import (MODEL_CONFIG_FILE, architecture_differences, architecture_json,
                                                    read_checkpoint_architecture)
from qwen3vl.train import optimizer_shards

log = logging.getLogger(__name__)

TRACKER = "latest"
CONFIG_FILE = "config.yaml"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    """The counters that resume restores (the same on every rank)."""

    step: int = 0  # optimizer steps taken (skipped NaN steps included)
    consumed_samples: int = 0  # global samples (packed rows count their segments)
    consumed_tokens: int = 0  # global supervised + unsupervised real tokens
    skipped_steps: int = 0  # steps whose loss was NaN/Inf: no update applied
    consecutive_nan: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__})


# ---- paths ------------------------------------------------------------------------------------------

def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def iteration_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"iter_{step:07d}"


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The committed checkpoint the tracker names, or None when the run has none yet."""
    tracker = checkpoints_dir(run_dir) / TRACKER
    if not tracker.is_file():
        return None
    name = tracker.read_text().strip()
    path = checkpoints_dir(run_dir) / name
    if not _ITER_RE.match(name) or not path.is_dir():
        raise CheckpointError(f"{tracker} names '{name}', which is not a checkpoint directory in "
                              f"{checkpoints_dir(run_dir)}; fix or delete the tracker")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (-> its latest checkpoint), its checkpoints/ folder, or one checkpoint directory."""
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    for run_dir in (p, p.parent):
        if (checkpoints_dir(run_dir) / TRACKER).is_file() and (p == run_dir or p.name == "checkpoints"):
            latest = find_latest(run_dir)
            if latest is not None:
                return latest
    raise CheckpointError(f"{p} is neither a run directory with a committed checkpoint "
                          f"(<run_dir>/checkpoints/{TRACKER}) nor a checkpoint directory (with metadata.json)")


def committed_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of checkpoint directories at or before the tracker (later ones are uncommitted)."""
    latest = find_latest(run_dir)
    if latest is None:
        return []
    limit = _step_of(latest)
    return [s for s in _all_steps(run_dir) if s <= limit]


def _step_of(path: Path) -> int:
    return int(_ITER_RE.match(path.name).group(1))


def _all_steps(run_dir: str | os.PathLike) -> list[int]:
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name)))


# ---- distributed helpers ------------------------------------------------------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout_signature() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


# ---- RNG --------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Every generator a training step can draw from on this rank (python, numpy, torch, CUDA, and
    megatron's model-parallel RNG tracker)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ---- the sharded state dict -------------------------------------------------------------------------

def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """megatron's DDP wrapper and Float16Module hold the real model in ``.module``."""
    while isinstance(chunk, (_BaseDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    # Each chunk's own sharded_state_dict; the ViT (qwen3vl.model.vision_encoder) defines one that saves
    # the tensor-parallel shards of its blocks and DeepStack mergers.
    n = len(model_chunks)
    return {_model_key(i, n): unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _sharded_state_dict(model_chunks, optimizer, scheduler, state: TrainState | None, loader_state: Any,
                        *, is_loading: bool, with_optimizer: bool, with_rank_state: bool,
                        all_loader_states: int | None = None,
                        optimizer_key_prefixes: Sequence[str] | None = None) -> dict[str, Any]:
    sd = _model_sharded_state_dict(model_chunks)
    if with_optimizer and optimizer is not None:
        sd["optimizer"] = optimizer_shards.sharded_state_dict(optimizer, dict(sd), optimizer_key_prefixes)
    if with_optimizer and scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    if state is not None:
        sd["train_state"] = state.to_dict()
        sd["layout"] = _layout_signature()
    if with_rank_state:
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        sd["rng_state"] = ShardedObject("rng_state", capture_rng_state() if not is_loading else None,
                                        (world,), (rank,), replica_id=0)
        # Every rank of one DP replica (its TP/PP/CP peers) reads the same data; one of them saves.
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        peer = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                ps.get_context_parallel_rank())
        sd["loader_state"] = ShardedObject("loader_state", loader_state, (dp_size,), (dp_rank,), replica_id=peer)
    if all_loader_states:  # loading under another layout: the states of all the saved DP ranks
        me = dist.get_rank() if dist.is_initialized() else 0  # every rank reads them all; one is "main"
        sd["loader_state"] = [ShardedObject("loader_state", None, (all_loader_states,), (i,), replica_id=me)
                              for i in range(all_loader_states)]
    return sd


# ---- save -------------------------------------------------------------------------------------------

# Called after every rank wrote its shards and before the tracker moves (tests use it to kill a save
# in the middle; nothing else should).
_before_commit: Callable[[], None] = lambda: None


def save_checkpoint(
    run_dir: str | os.PathLike,
    state: TrainState,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    loader_state: Any = None,
    config_yaml: str | None = None,
    keep_last_k: int | None = None,
    extra_files: dict[str, str] | None = None,
    async_saver=None,
) -> Path:
    """Saves step ``state.step`` on every rank (collective), commits it, applies retention.

    ``extra_files``: small text files (name -> content) rank 0 writes into the checkpoint directory
    before the commit, e.g. the schedule plan (qwen3vl.train.schedule). With ``async_saver`` (a
    ``qwen3vl.train.checkpoint_async.AsyncSaver``) the shards are written in the background and the
    commit happens when the saver finds every rank's writer done (its ``poll`` / ``wait``); the state is
    captured now, so training may continue at once.
    """
    if async_saver is not None:
        async_saver.wait()  # the previous save commits first: it is the one remove_uncommitted must keep
    target = iteration_dir(run_dir, state.step)
    if _rank() == 0:
        remove_uncommitted(run_dir)
        if target.exists():  # a committed checkpoint of the same step (e.g. end save right after K)
            shutil.rmtree(target)
        target.mkdir(parents=True)
    _barrier()
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)  # a save before the first step (e.g. the initial weights)
    sd = _sharded_state_dict(model_chunks, optimizer, scheduler, state, loader_state,
                             is_loading=False, with_optimizer=True, with_rank_state=True)
    request = dist_checkpointing.save(sd, str(target), async_sharded_save=async_saver is not None)
    if _rank() == 0:
        files = {**({CONFIG_FILE: config_yaml} if config_yaml is not None else {}), **(extra_files or {})}
        architecture = _architecture(model_chunks)
        if architecture is not None:
            files[MODEL_CONFIG_FILE] = architecture
        for name, text in files.items():
            _write_atomic(target / name, text)

    def commit() -> None:
        _barrier()  # every rank's shards are on disk
        _before_commit()
        if _rank() == 0:
            _write_atomic(checkpoints_dir(run_dir) / TRACKER, target.name + "\n")
            if keep_last_k:
                apply_retention(run_dir, keep_last_k)
        _barrier()  # nobody reads the tracker or starts the next save before it moved

    if async_saver is None:
        commit()
    else:
        async_saver.schedule(request, commit)
    return target


def _architecture(model_chunks: Sequence[torch.nn.Module]) -> str | None:
    """model_config.json of a Qwen3-VL model: its architecture and parameter dtype, so that exports and
    verify read a training checkpoint like a converted one (other test models record none)."""
    model = unwrap(model_chunks[0])
    if getattr(model, "model_config", None) is None:
        return None
    return architecture_json(model.model_config, next(model.parameters()).dtype)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power loss
    finally:
        os.close(dir_fd)


def apply_retention(run_dir: str | os.PathLike, keep_last_k: int) -> list[int]:
    """Deletes committed checkpoints beyond the last ``keep_last_k``; never the latest. Returns the
    deleted steps."""
    if keep_last_k < 1:
        raise CheckpointError(f"keep_last_k={keep_last_k}: keep at least 1 checkpoint (or None to keep all)")
    steps = committed_steps(run_dir)
    latest = steps[-1] if steps else None
    doomed = [s for s in steps[:-keep_last_k] if s != latest]
    for s in doomed:
        shutil.rmtree(iteration_dir(run_dir, s), ignore_errors=True)
    return doomed


def remove_uncommitted(run_dir: str | os.PathLike) -> list[int]:
    """Removes checkpoint directories newer than the tracker: leftovers of a save that crashed."""
    latest = find_latest(run_dir)
    limit = _step_of(latest) if latest is not None else -1
    partial = [s for s in _all_steps(run_dir) if s > limit]
    for s in partial:
        log.warning("removing uncommitted checkpoint %s (a save that did not finish)", iteration_dir(run_dir, s))
        shutil.rmtree(iteration_dir(run_dir, s), ignore_errors=True)
    return partial


# ---- load -------------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    path: Path
    state: TrainState
    # What the loader's load_state_dict takes: this DP rank's state under the same layout, the list of
    # every saved DP rank's state under another.
    loader_state: Any = None
    restored_rng: bool = False
    saved_layout: dict[str, int] = field(default_factory=dict)


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
) -> LoadResult:
    """Full resume: model, optimizer, scheduler, counters; RNG and loader state when the layout is the
    one they were saved under. ``path``: a run directory or a checkpoint directory. Collective."""
    ckpt = resolve_checkpoint(path)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    saved_layout = dict(common.get("layout", {}))
    same_layout = saved_layout == _layout_signature()
    if not same_layout:
        log.warning("checkpoint %s was saved under layout %s, loading under %s: model and optimizer are "
                    "resharded, the data loader position is re-partitioned; per-rank RNG is NOT restored", ckpt,
                    saved_layout, _layout_signature())
    prefixes = None
    if optimizer is not None:
        # The common part first (param groups, steps; it allocates missing Adam moments): the loading
        # state dict's optimizer boxes are views of those tensors and get filled in place.
        settings = _group_settings(optimizer)
        optimizer_shards.load_common(optimizer, common["optimizer"])
        _restore_group_settings(optimizer, settings)
        prefixes = optimizer_shards.key_prefixes(str(ckpt), optimizer)
    sd = _sharded_state_dict(model_chunks, optimizer, scheduler, TrainState(), None, is_loading=True,
                             with_optimizer=True, with_rank_state=same_layout, optimizer_key_prefixes=prefixes,
                             all_loader_states=None if same_layout else saved_layout.get("dp"))
    targets = optimizer_shards.box_targets(optimizer, sd["optimizer"]) if optimizer is not None else {}
    loaded = dist_checkpointing.load(sd, str(ckpt))
    _apply_model(model_chunks, loaded)
    if optimizer is not None:
        optimizer_shards.apply_loaded(optimizer, targets, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        restore_rng_state(loaded["rng_state"])
    _barrier()
    return LoadResult(path=ckpt, state=TrainState.from_dict(loaded["train_state"]),
                      loader_state=loaded.get("loader_state"),
                      restored_rng=same_layout, saved_layout=saved_layout)


def _ensure_optimizer_state(optimizer) -> None:
    """Gives a fresh optimizer zero Adam moments and step 0 (what torch's AdamW starts from), without
    touching the parameters, so that a save before the first step has an optimizer state to write.

    megatron's own remedy (_init_optimizer_states_with_dummy_values) takes a real step, which weight
    decay turns into a parameter change.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                if isinstance(inner, torch.optim.Adam) and "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)


_GROUP_SETTINGS = ("max_lr", "min_lr", "wd_mult", "lr_mult", "is_decoupled_lr", "default_config")


def _inner_optimizers(optimizer) -> list:
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer]) if hasattr(opt, "optimizer")]


def _group_settings(optimizer) -> list[list[dict]]:
    """This run's per-group hyperparameters (per-part lrs, weight-decay multipliers), from its config.

    megatron's load replaces them with the checkpoint's (every group then gets the base max_lr; its
    own loading state dict already round-trips them that way), so they are taken before the load and
    put back afterwards; the scheduler then recomputes lr and weight decay from them.
    """
    return [[{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in opt.optimizer.param_groups]
            for opt in _inner_optimizers(optimizer)]


def _restore_group_settings(optimizer, group_settings: list[list[dict]]) -> None:
    for opt, settings in zip(_inner_optimizers(optimizer), group_settings):
        for group, kept in zip(opt.optimizer.param_groups, settings):
            group.update(kept)
        # megatron hands every parameter the *same* 'step' tensor, which torch's AdamW then increments
        # in place once per parameter per step: give each parameter its own.
        for param_state in opt.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def load_weights(path: str | os.PathLike, model_chunks: Sequence[torch.nn.Module]) -> Path:
    """Weights only (stage hand-off ``init_from``), under any layout: no optimizer, scheduler,
    counters, RNG or loader state. Collective."""
    ckpt = resolve_checkpoint(path)
    _warn_on_other_architecture(ckpt, model_chunks)
    loaded = dist_checkpointing.load(_model_sharded_state_dict(model_chunks), str(ckpt))
    _apply_model(model_chunks, loaded)
    _barrier()
    return ckpt


def _warn_on_other_architecture(ckpt: Path, model_chunks: Sequence[torch.nn.Module]) -> None:
    """Weights load into any model of the same shapes; fields without weights (rope theta, norm epsilon,
    ...) could differ unnoticed, so say so when the checkpoint records them."""
    model = unwrap(model_chunks[0])
    if _rank() != 0 or getattr(model, "model_config", None) is None or not (ckpt / MODEL_CONFIG_FILE).is_file():
        return
    differences = architecture_differences(read_checkpoint_architecture(ckpt).model, model.model_config)
    if differences:
        log.warning("%s records another architecture than this run's model: %s; set model.overrides to match "
                    "unless the change is meant", ckpt, ", ".join(f"{field} {a!r} (this run {b!r})"
                                                               for field, a, b in differences))


def _apply_model(model_chunks: Sequence[torch.nn.Module], loaded: dict[str, Any]) -> None:
    n = len(model_chunks)
    for i, chunk in enumerate(model_chunks):
        # A 0-layer virtual stage that is neither first nor last holds no parameters, and
        # dist_checkpointing returns no entry for its empty state dict.
        unwrap(chunk).load_state_dict(loaded.get(_model_key(i, n), {}), strict=True)
