"""The architecture saved next to the weights of every one of our megatron dist checkpoints.

A checkpoint directory (converted by ``qwen3vl-convert``, assembled, or saved by a training run) is a
megatron dist checkpoint of ``{"model": model.sharded_state_dict(), ...}`` -- so ``init_from`` and
``load_weights`` read all of them -- plus:

    model_config.json   our ``Qwen3VLConfig``, the dtype the parameters are stored in, and the MoE expert
                        layout of the HF weights it came from (what an export writes by default)
    hf_config.json      converted checkpoints only: the Hugging Face config.json it came from (so an
                        export writes it back as is)

dist checkpointing reshards on load, so a checkpoint saved under one TP/PP/EP layout loads under any other.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from qwen3vl.model.config import Qwen3VLConfig, TextConfig, VisionConfig

MODEL_CONFIG_FILE = "model_config.json"
HF_CONFIG_FILE = "hf_config.json"
MODEL_KEY = "model"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointArchitectureError(ValueError):
    """The checkpoint directory does not say which architecture its weights belong to."""


@dataclass
class CheckpointArchitecture:
    """What a checkpoint says about its weights: the model they belong to and how they are stored."""

    model: Qwen3VLConfig
    dtype: torch.dtype | None  # dtype of the saved parameters (None: not recorded)
    hf_config: dict | None = None  # the original config.json of converted checkpoints
    hf_expert_layout: str | None = None  # MoE expert layout of the HF weights it came from


def config_to_dict(config: Qwen3VLConfig) -> dict[str, Any]:
    return asdict(config)


def config_from_dict(data: dict[str, Any]) -> Qwen3VLConfig:
    """Inverse of ``config_to_dict``; unknown keys are refused so a stale file cannot load silently."""

    def build(cls, values: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointArchitectureError(f"{MODEL_CONFIG_FILE} has keys {unknown} that {cls.__name__} does "
                                              "not know; it was written by a different version of qwen3vl")
        # JSON has no tuples; the dataclasses use them for sequences.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    top = dict(data)
    vision = build(VisionConfig, top.pop("vision"))
    text = build(TextConfig, top.pop("text"))
    return build(Qwen3VLConfig, dict(top, vision=vision, text=text)).validate()


def architecture_differences(ours, theirs, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(field, ours, theirs) wherever two ``Qwen3VLConfig`` differ (the name is not architecture)."""
    out = []
    for f in fields(ours):
        if f.name == "name":
            continue
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if hasattr(a, "__dataclass_fields__"):
            out += architecture_differences(a, b, f"{prefix}{f.name}.")
        elif a != b:
            out.append((f"{prefix}{f.name}", a, b))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported parameter dtype {dtype}; use one of {', '.join(DTYPES)}")


def architecture_json(config: Qwen3VLConfig, dtype: torch.dtype, hf_expert_layout: str | None = None) -> str:
    """The contents of ``model_config.json``."""
    payload = {"model": config_to_dict(config), "dtype": dtype_name(dtype), "hf_expert_layout": hf_expert_layout}
    return json.dumps(payload, indent=2) + "\n"


def write_checkpoint_architecture(directory: str | os.PathLike, config: Qwen3VLConfig, dtype: torch.dtype,
                                  hf_config: dict | None = None, hf_expert_layout: str | None = None) -> None:
    directory = Path(directory)
    (directory / MODEL_CONFIG_FILE).write_text(architecture_json(config, dtype, hf_expert_layout))
    if hf_config is not None:
        (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def read_checkpoint_architecture(directory: str | os.PathLike) -> CheckpointArchitecture:
    """The architecture recorded in one checkpoint directory (not a run directory)."""
    directory = Path(directory)
    path = directory / MODEL_CONFIG_FILE
    if not path.is_file():
        raise CheckpointArchitectureError(
            f"{directory} has no {MODEL_CONFIG_FILE}, so it does not say which architecture its weights belong "
            "to: give a checkpoint written by qwen3vl-convert or by a qwen3vl training run")
    payload = json.loads(path.read_text())
    hf_path = directory / HF_CONFIG_FILE
    return CheckpointArchitecture(model=config_from_dict(payload["model"]), dtype=DTYPES[payload["dtype"]],
                                  hf_config=json.loads(hf_path.read_text()) if hf_path.is_file() else None,
                                  hf_expert_layout=payload.get("hf_expert_layout"))
