"""The two conversion commands of ``qwen3vl-convert``: Hugging Face -> megatron and back.

Both run on one process with the model built unsharded (TP = PP = EP = 1) on the CPU: dist
checkpointing writes shards that any layout can read and, on load, assembles full tensors from
whatever layout a checkpoint was saved under. The name/layout mapping between the two state dicts
is ``qwen3vl.model.hf_weights``; the disk formats are ``hf_checkpoint`` and ``mcore_checkpoint``.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch

from qwen3vl.model.hf_checkpoint import (DEFAULT_MAX_SHARD_BYTES, HF5_LAYOUT, CheckpointMismatchError,
                                         load_hf_checkpoint, our_config, save_hf_checkpoint)
from qwen3vl.model.mcore_checkpoint import (DTYPES, MODEL_KEY, CheckpointConfigError, dtype_name,
                                            read_checkpoint_config, write_checkpoint_config)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "wrong input" (printed as one message, exit 2), not "bug" (traceback)."""
    from qwen3vl.model.config import ConfigError
    from qwen3vl.parallel.layout import LayoutError
    from qwen3vl.train.checkpoint import CheckpointError

    return (CheckpointMismatchError, CheckpointConfigError, CheckpointError, ConfigError, LayoutError,
            FileNotFoundError, FileExistsError)


# ---------------------------------------------------------------------------------------------
# One process, unsharded


@contextlib.contextmanager
def parallel_session(layout=None):
    """megatron process groups for ``layout`` (default: everything 1); yields the world size.

    Joins the torchrun job when there is one; otherwise (a plain command line) starts a one-rank gloo
    group. Tears down only what it started, so it also runs inside an existing group (the tests)."""
    import torch.distributed as dist

    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    started = not dist.is_initialized()
    if started and "WORLD_SIZE" not in os.environ:
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                            ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
    initialize_parallel(layout or ParallelLayout())
    try:
        yield dist.get_world_size()
    finally:
        destroy_parallel()
        if started:
            dist.destroy_process_group()


@contextlib.contextmanager
def single_process_parallel():
    """TP = PP = CP = EP = 1 on exactly one process: conversions build the whole model unsharded."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise RuntimeError("hf-to-mcore and mcore-to-hf run on a single process; start them without torchrun "
                           "(the checkpoint they write loads under any layout)")
    with parallel_session():
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(config, dtype: torch.dtype, pipeline_layers=None, **overrides) -> torch.nn.Module:
    """This rank's pipeline stage of the model (no virtual stages), for the current parallel state;
    ``overrides`` go to the LLM's TransformerConfig (e.g. sequence_parallel)."""
    from qwen3vl.model.build import build_model_chunks

    [model] = build_model_chunks(config, dtype, pipeline_layers, **overrides)
    return model


def _check_mapped_keys(mapped: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """The mapped HF weights must fill exactly the model's parameters, with the same shapes."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    problems = [f"our model has no parameter {k} (from the HF weights)" for k in sorted(set(mapped) - set(own))]
    problems += [f"the HF weights give no value for our parameter {k}" for k in sorted(set(own) - set(mapped))]
    problems += [f"{k}: mapped HF shape {list(mapped[k].shape)} but our parameter is {list(own[k].shape)}"
                 for k in sorted(set(own) & set(mapped)) if mapped[k].shape != own[k].shape]
    if problems:
        raise CheckpointMismatchError("the converted weights do not fit the model built from config.json:\n  "
                                      + "\n  ".join(problems[:20]))


# ---------------------------------------------------------------------------------------------
# hf-to-mcore


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto") -> Path:
    """Read an HF directory, map the weights onto our model, save a dist checkpoint + config."""
    from qwen3vl.model.hf_weights import hf_to_mcore_state_dict

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: give a new directory to --out")
    hf = load_hf_checkpoint(hf_dir)
    config = our_config(hf.config, name=Path(hf_dir).resolve().name)
    param_dtype = hf.dtype if dtype == "auto" else DTYPES[dtype]
    mapped = hf_to_mcore_state_dict(hf.state_dict, config)
    with single_process_parallel():
        from megatron.core import dist_checkpointing  # after the input checks: it takes seconds to import

        model = build_model(config, param_dtype)
        _check_mapped_keys(mapped, model)
        model.load_state_dict({k: v.to(param_dtype) for k, v in mapped.items()}, strict=False)
        out.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({MODEL_KEY: model.sharded_state_dict()}, str(out))
        write_checkpoint_config(out, config, param_dtype, hf_config=hf.config, hf_expert_layout=hf.expert_layout)
    print(f"wrote {out} ({config.name}, {dtype_name(param_dtype)}, from {hf_dir})")
    return out


# ---------------------------------------------------------------------------------------------
# mcore-to-hf


def stored_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype most model tensors are stored in (optimizer state, fp32 in training checkpoints,
    is not counted)."""
    from megatron.core import dist_checkpointing

    counts: dict[torch.dtype, int] = {}
    for key, tensor in dist_checkpointing.load_tensors_metadata(str(checkpoint)).items():
        if not key.startswith("optimizer"):
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    if not counts:
        raise CheckpointConfigError(f"{checkpoint} holds no model tensors")
    return max(counts, key=counts.get)


def load_our_weights(checkpoint: str | os.PathLike, model_chunks) -> Path:
    """Model weights of a converted or training checkpoint (or a run directory's latest) into
    ``model_chunks``, under the current layout; optimizer state is not read. Collective."""
    from qwen3vl.train.checkpoint import load_weights

    return load_weights(checkpoint, model_chunks)


def mcore_to_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
                expert_layout: str = "auto", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Load our checkpoint on one process and write config.json + safetensors. ``expert_layout``
    "auto": the layout of the HF weights a converted checkpoint came from, else transformers 5.x's."""
    from qwen3vl.model.hf_config import config_to_hf
    from qwen3vl.model.hf_weights import mcore_to_hf_state_dict
    from qwen3vl.train.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    info = read_checkpoint_config(path)
    load_dtype = stored_dtype(path)
    out_dtype = DTYPES[dtype] if dtype != "auto" else (info.dtype or load_dtype)
    if expert_layout == "auto":
        expert_layout = info.hf_expert_layout or HF5_LAYOUT
    with single_process_parallel():
        model = build_model(info.model, load_dtype)
        load_our_weights(path, [model])
        own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        state_dict = mcore_to_hf_state_dict(own, info.model)
    state_dict = {k: v.to(out_dtype) for k, v in state_dict.items()}
    hf_config = dict(info.hf_config) if info.hf_config is not None else config_to_hf(info.model, style="v5")
    if hf_config.get("dtype", hf_config.get("torch_dtype")) != dtype_name(out_dtype):
        hf_config["dtype"] = dtype_name(out_dtype)
        hf_config.pop("torch_dtype", None)  # the pre-5.x spelling of the same field
    save_hf_checkpoint(out_dir, hf_config, state_dict, expert_layout=expert_layout,
                       max_shard_bytes=max_shard_bytes)
    print(f"wrote {out_dir} (from {path}, {dtype_name(out_dtype)}, experts: {expert_layout})")
    return Path(out_dir)
