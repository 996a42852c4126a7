"""The conversion commands of ``qwen3vl-convert``: Hugging Face -> megatron and back, streaming.

Both go tensor by tensor through the weight table (``qwen3vl.model.interop.hf_weights``), so memory stays
at a few tensors whatever the depth of the model:

* ``hf-to-mcore`` builds the model on the *meta* device (no memory) only to learn which keys and chunks its
  ``sharded_state_dict`` asks for, then writes each chunk with megatron's dist checkpointing as soon as it
  is made from the safetensors tensors it needs. The result loads under any layout (dist checkpointing
  reshards on load).
* ``mcore-to-hf`` needs no model and no process group: it reads each tensor's region straight from the
  dist checkpoint files, whatever TP/PP/EP layout they were saved under, and writes safetensors shards.

``workers`` > 1 writes that many files at once (threads; the heavy parts release the GIL).
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf

from qwen3vl.model.build import build_model_chunks
from qwen3vl.model.config import ModelConfigError
from qwen3vl.model.interop.dist_reader import DistCheckpointReader
from qwen3vl.model.interop.dist_writer import StreamingSaveStrategy
from qwen3vl.model.interop.hf_checkpoint import (DEFAULT_MAX_SHARD_BYTES, HF5_LAYOUT, CheckpointMismatchError,
                                                 open_hf_checkpoint, write_hf_checkpoint)
from qwen3vl.model.interop.hf_config import config_from_hf, config_to_hf
from qwen3vl.model.interop.hf_weights import qwen3vl_mappings
from qwen3vl.model.interop.mapped_tensors import MappedTensors
from qwen3vl.model.interop.mcore_checkpoint import (DTYPES, MODEL_KEY, CheckpointArchitecture,
                                                    CheckpointArchitectureError, dtype_name,
                                                    read_checkpoint_architecture, write_checkpoint_architecture)
from qwen3vl.model.interop.safetensors_files import SafetensorsError
from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
from qwen3vl.parallel.layout import LayoutError, ParallelLayout
from qwen3vl.train.checkpoint import CONFIG_FILE, CheckpointError, resolve_checkpoint
from qwen3vl.train.config import ModelCfg, Qwen3VLTrainConfig
from qwen3vl.train.config_checks import build_model_config


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "wrong input" (printed as one message, exit 2), not "bug" (traceback)."""
    return (CheckpointMismatchError, CheckpointArchitectureError, CheckpointError, ModelConfigError, LayoutError,
            SafetensorsError, FileNotFoundError, FileExistsError)


# ---------------------------------------------------------------------------------------------
# Process groups


@contextlib.contextmanager
def parallel_session(layout=None, device: str = "auto"):
    """megatron process groups for ``layout`` (default: everything 1) on ``device`` (see
    ``qwen3vl.parallel.groups.resolve_device``); yields the world size.

    Joins the torchrun job when there is one; otherwise (a plain command line) starts a one-rank group.
    Tears down only what it started, so it also runs inside an existing group (the tests)."""
    started = not dist.is_initialized()
    if started and "WORLD_SIZE" not in os.environ:
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                            ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
    initialize_parallel(layout or ParallelLayout(), device=device)
    try:
        yield dist.get_world_size()
    finally:
        destroy_parallel()
        if started:
            dist.destroy_process_group()


@contextlib.contextmanager
def single_process_parallel():
    """TP = PP = CP = EP = 1 on exactly one process: the layout every converted checkpoint is written in."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise RuntimeError("hf-to-mcore and assemble run on a single process; start them without torchrun "
                           "(the checkpoint they write loads under any layout)")
    with parallel_session(device="cpu"):  # the model is built on the CPU: a conversion never needs a GPU
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Writing a dist checkpoint from any source of our full tensors


def new_output_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: give a new directory to --out")
    return out


def save_dist_checkpoint(out: Path, source: MappedTensors, dtype: torch.dtype, workers: int = 1) -> None:
    """Write every tensor of ``source`` (our full names) as the megatron dist checkpoint of its model,
    streaming; the model is only built on the meta device for its sharded_state_dict. One process."""
    config = source.config
    with single_process_parallel():
        with torch.device("meta"):  # created there (no memory) and kept there
            [model] = build_model_chunks(config, dtype, perform_initialization=False, device="meta")
        expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
        names = {name for group in source.groups for name in group}
        problems = [f"our model has no parameter {k} (the weight table gives one)" for k in sorted(names - set(expected))]
        problems += [f"nothing gives our parameter {k}" for k in sorted(set(expected) - names)]
        if problems:
            raise CheckpointMismatchError("the converted weights do not fit the model built from the config:\n  "
                                          + "\n  ".join(problems[:20]))

        def produce(name: str) -> torch.Tensor:
            tensor = source.get(name)
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointMismatchError(f"{name}: mapped shape {list(tensor.shape)} but our parameter is "
                                              f"{list(expected[name])}")
            return tensor

        out.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({MODEL_KEY: model.sharded_state_dict()}, str(out),
                                sharded_strategy=StreamingSaveStrategy(produce, dtype, threads=workers))


# ---------------------------------------------------------------------------------------------
# hf-to-mcore


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
                workers: int = 1) -> Path:
    """An HF directory -> a dist checkpoint + model_config.json + hf_config.json, tensor by tensor."""
    out = new_output_dir(out_dir)
    hf = open_hf_checkpoint(hf_dir)  # headers only; every name and shape checked before any data
    config = config_from_hf(hf.config, name=Path(hf_dir).resolve().name)
    param_dtype = hf.dtype if dtype == "auto" else DTYPES[dtype]
    source = MappedTensors(qwen3vl_mappings(config), lambda names: [hf.read(n) for n in names], config,
                           direction="ours", keep=2 * workers)
    save_dist_checkpoint(out, source, param_dtype, workers)
    write_checkpoint_architecture(out, config, param_dtype, hf_config=hf.config, hf_expert_layout=hf.expert_layout)
    print(f"wrote {out} ({config.name}, {dtype_name(param_dtype)}, from {hf_dir})")
    return out


# ---------------------------------------------------------------------------------------------
# mcore-to-hf


def checkpoint_architecture(path: Path) -> CheckpointArchitecture:
    """The architecture of one checkpoint; training checkpoints written before model_config.json was saved
    with them are read from their config.yaml (preset + overrides)."""
    try:
        return read_checkpoint_architecture(path)
    except CheckpointArchitectureError:
        if not (path / CONFIG_FILE).is_file():
            raise
    model = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE).get("model") or {}, resolve=True)
    if "preset" not in model:
        raise CheckpointArchitectureError(f"{path / CONFIG_FILE} has no model.preset: it is not a qwen3vl "
                                          "training config")
    run = Qwen3VLTrainConfig(model=ModelCfg(preset=model["preset"], overrides=model.get("overrides") or {}))
    return CheckpointArchitecture(model=build_model_config(run), dtype=None)


def mcore_to_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
                expert_layout: str = "auto", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                workers: int = 1) -> Path:
    """Our checkpoint (any layout) -> config.json + safetensors, tensor by tensor, without a model.
    ``expert_layout`` "auto": the layout of the HF weights a converted checkpoint came from, else 5.x's."""
    path = resolve_checkpoint(ckpt)
    info = checkpoint_architecture(path)
    reader = DistCheckpointReader(path)
    out_dtype = DTYPES[dtype] if dtype != "auto" else (info.dtype or reader.model_dtype())
    if expert_layout == "auto":
        expert_layout = info.hf_expert_layout or HF5_LAYOUT
    source = MappedTensors(qwen3vl_mappings(info.model), reader.read, info.model, direction="theirs")
    missing = []
    for name in source.sources:
        try:
            reader.locate(name)
        except KeyError as error:
            missing.append(str(error.args[0]))
    if missing:
        raise CheckpointMismatchError(f"the checkpoint does not hold the weights its {info.model.name} architecture "
                                      "needs:\n  " + "\n  ".join(missing[:20]))
    hf_config = dict(info.hf_config) if info.hf_config is not None else config_to_hf(info.model, style="v5")
    if hf_config.get("dtype", hf_config.get("torch_dtype")) != dtype_name(out_dtype):
        hf_config["dtype"] = dtype_name(out_dtype)
        hf_config.pop("torch_dtype", None)  # the pre-5.x spelling of the same field
    write_hf_checkpoint(out_dir, hf_config, source.groups, source.make, out_dtype, expert_layout=expert_layout,
                        max_shard_bytes=max_shard_bytes, workers=workers)
    print(f"wrote {out_dir} (from {path}, {dtype_name(out_dtype)}, experts: {expert_layout})")
    return Path(out_dir)
