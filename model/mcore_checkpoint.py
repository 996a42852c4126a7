"""Our model's weights as a megatron dist checkpoint, and the architecture saved next to them.

A converted checkpoint directory (``qwen3vl-convert hf-to-mcore``) is a megatron dist checkpoint of
``{"model": model.sharded_state_dict()}`` -- the same top-level key the training checkpoints use
(``qwen3vl.train.checkpoint``), so ``init_from`` and ``load_weights`` read both -- plus:

    model_config.json   our ``Qwen3VLConfig``, the parameter dtype (what to build before loading) and
                        the MoE expert layout of the source (what an export writes by default)
    hf_config.json      the Hugging Face config.json it came from (so an export writes it back as is)

A training checkpoint instead carries ``config.yaml`` (the resolved run config: a preset name plus
dotted overrides); ``read_checkpoint_config`` understands both. dist checkpointing reshards on load,
so a checkpoint saved under one TP/PP/EP layout loads under any other.
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
TRAIN_CONFIG_FILE = "config.yaml"  # written by qwen3vl.train.checkpoint with every checkpoint
MODEL_KEY = "model"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointConfigError(ValueError):
    """The checkpoint directory does not say which architecture its weights belong to."""


@dataclass
class CheckpointConfig:
    model: Qwen3VLConfig
    dtype: torch.dtype | None  # dtype of the saved parameters when recorded (converted checkpoints)
    hf_config: dict | None  # the original config.json for converted checkpoints, else None
    hf_expert_layout: str | None = None  # MoE expert layout of the HF weights it came from


# ---------------------------------------------------------------------------------------------
# Qwen3VLConfig <-> JSON


def config_to_dict(config: Qwen3VLConfig) -> dict[str, Any]:
    return asdict(config)


def config_from_dict(data: dict[str, Any]) -> Qwen3VLConfig:
    """Inverse of ``config_to_dict``; unknown keys are refused so a stale file cannot load silently."""

    def build(cls, values: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointConfigError(f"{MODEL_CONFIG_FILE} has keys {unknown} that {cls.__name__} does not "
                                        f"know; it was written by a different version of qwen3vl")
        # JSON has no tuples; the dataclasses use them for sequences.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    top = dict(data)
    vision = build(VisionConfig, top.pop("vision"))
    text = build(TextConfig, top.pop("text"))
    return build(Qwen3VLConfig, dict(top, vision=vision, text=text)).validate()


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported parameter dtype {dtype}; use one of {', '.join(DTYPES)}")


def write_checkpoint_config(directory: str | os.PathLike, config: Qwen3VLConfig, dtype: torch.dtype,
                            hf_config: dict | None = None, hf_expert_layout: str | None = None) -> None:
    directory = Path(directory)
    payload = {"model": config_to_dict(config), "dtype": dtype_name(dtype), "hf_expert_layout": hf_expert_layout}
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    if hf_config is not None:
        (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def read_checkpoint_config(directory: str | os.PathLike) -> CheckpointConfig:
    """The architecture of a converted checkpoint (model_config.json) or a training checkpoint
    (config.yaml: preset + overrides)."""
    directory = Path(directory)
    if (directory / MODEL_CONFIG_FILE).is_file():
        payload = json.loads((directory / MODEL_CONFIG_FILE).read_text())
        hf_path = directory / HF_CONFIG_FILE
        hf_config = json.loads(hf_path.read_text()) if hf_path.is_file() else None
        return CheckpointConfig(model=config_from_dict(payload["model"]), dtype=DTYPES[payload["dtype"]],
                                hf_config=hf_config, hf_expert_layout=payload.get("hf_expert_layout"))
    if (directory / TRAIN_CONFIG_FILE).is_file():
        return _config_from_training_yaml(directory / TRAIN_CONFIG_FILE)
    raise CheckpointConfigError(
        f"{directory} has neither {MODEL_CONFIG_FILE} (written by qwen3vl-convert hf-to-mcore) nor "
        f"{TRAIN_CONFIG_FILE} (written with every training checkpoint): cannot tell which architecture "
        f"its weights belong to")


def _config_from_training_yaml(path: Path) -> CheckpointConfig:
    from omegaconf import OmegaConf

    from qwen3vl.train.config import ModelCfg, Qwen3VLTrainConfig
    from qwen3vl.train.config_checks import build_model_config

    # Only the model section matters here; the rest of the run config is not ours to validate.
    model = OmegaConf.to_container(OmegaConf.load(path).get("model") or {}, resolve=True)
    if "preset" not in model:
        raise CheckpointConfigError(f"{path} has no model.preset: it is not a qwen3vl training config")
    run = Qwen3VLTrainConfig(model=ModelCfg(preset=model["preset"], overrides=model.get("overrides") or {}))
    # No dtype recorded: an export keeps the dtype the tensors are stored in.
    return CheckpointConfig(model=build_model_config(run), dtype=None, hf_config=None)
