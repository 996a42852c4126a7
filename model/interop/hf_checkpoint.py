"""Hugging Face Qwen3-VL checkpoint directories on disk: checked against the config, read and written one
tensor at a time.

A directory holds ``config.json`` plus the weights as one ``model.safetensors`` or as shards listed
in ``model.safetensors.index.json``. Opening a directory reads the headers only; ``HFCheckpoint.read``
then gives one tensor in the *canonical* form, the transformers 5.x in-memory layout. The name mapping
to our megatron model is ``qwen3vl.model.interop.hf_weights``.

Two on-disk quirks are absorbed here (the released checkpoints against transformers 5.x):

* MoE experts. The original release stores ``mlp.experts.gate_up_proj`` as ``[E, H, 2I]`` and
  ``down_proj`` as ``[E, I, H]``; transformers 5.x (and its ``save_pretrained``) uses the
  transposes ``[E, 2I, H]`` / ``[E, H, I]``. Both are accepted, detected by shape; when a tensor is
  square in the last two dims the shape cannot tell, and the ``transformers_version`` that wrote
  ``config.json`` decides (releases were written by 4.x).
* Tied embeddings (2B, 4B). The top-level ``tie_word_embeddings`` decides; a tied checkpoint has
  no ``lm_head.weight`` and an untied one must have it.

Every other disagreement between the weights and the config (missing or unexpected keys, shapes)
is refused with a ``CheckpointMismatchError`` naming the key and both shapes, before any tensor is
read. The expected names and shapes come from transformers itself (its model on the meta device).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from qwen3vl.model.interop.safetensors_files import (TensorSpec, plan_shards, read_index, read_tensor,
                                                     stored_dtype, write_file, write_index)
from qwen3vl.model.interop.transformers_models import transformers_shapes

CONFIG_FILE = "config.json"
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.language_model.embed_tokens.weight"
# Expert tensors have no ".weight" suffix in either layout.
EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Layout names, as accepted by ``write_hf_checkpoint(expert_layout=...)`` and the CLI.
HF5_LAYOUT, RELEASE_LAYOUT = "hf5", "release"
EXPERT_LAYOUTS = (HF5_LAYOUT, RELEASE_LAYOUT)
# Shards are cut below this size by default (what transformers does too).
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


class CheckpointMismatchError(ValueError):
    """The weights do not fit the config (or the config is not a Qwen3-VL one)."""


def _is_expert_key(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def _transposed(shape: Sequence[int]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[1])


@dataclass
class HFCheckpoint:
    directory: Path
    config: dict  # the config.json contents, untouched
    tensors: dict[str, TensorSpec]  # as stored on disk
    expert_layout: str | None  # layout found on disk: "hf5", "release", or None (dense model)

    @property
    def dtype(self) -> torch.dtype:
        return stored_dtype(self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor in the canonical (transformers 5.x) layout."""
        tensor = read_tensor(self.directory, self.tensors[name])
        if self.expert_layout == RELEASE_LAYOUT and _is_expert_key(name):
            tensor = tensor.transpose(1, 2).contiguous()
        return tensor


# ---------------------------------------------------------------------------------------------
# Checks


def check_model_type(config: dict, allowed: Sequence[str], what: str, where: str = "config.json") -> None:
    """Refuse a config.json of another kind of model (``what`` says which kind is wanted)."""
    if config.get("model_type") not in allowed:
        raise CheckpointMismatchError(f"{where} has model_type={config.get('model_type')!r}; {what} "
                                      f"({' or '.join(allowed)})")


def expected_hf_shapes(config: dict) -> dict[str, torch.Size]:
    """Every key a checkpoint for ``config`` must hold, with its canonical (5.x) shape."""
    check_model_type(config, _MODEL_TYPES, "only Qwen3-VL checkpoints can be converted")
    shapes = transformers_shapes(config)
    if config.get("tie_word_embeddings", False):
        shapes.pop(LM_HEAD, None)
    return shapes


def _written_by_transformers_4(config: dict) -> bool:
    version = str(config.get("transformers_version", ""))
    return version.split(".")[0].isdigit() and int(version.split(".")[0]) < 5


def _expert_tensor_layout(name: str, shape: Sequence[int], expected: Sequence[int], config: dict) -> str:
    shape, expected = tuple(shape), tuple(expected)
    if shape == expected and shape == _transposed(expected):
        return RELEASE_LAYOUT if _written_by_transformers_4(config) else HF5_LAYOUT
    if shape == expected:
        return HF5_LAYOUT
    if shape == _transposed(expected):
        return RELEASE_LAYOUT
    raise CheckpointMismatchError(
        f"{name}: checkpoint shape {list(shape)} fits neither expert layout the config implies: "
        f"transformers 5.x {list(expected)} or release {list(_transposed(expected))}; check num_experts, "
        f"moe_intermediate_size and hidden_size in config.json")


def check_tied_embeddings(names, config: dict) -> None:
    tied = bool(config.get("tie_word_embeddings", False))
    if tied and LM_HEAD in names:
        raise CheckpointMismatchError(
            f"config.json says tie_word_embeddings=true but the weights contain {LM_HEAD}; set "
            f"tie_word_embeddings to false to keep a separate output layer, or drop {LM_HEAD}")
    if not tied and LM_HEAD not in names:
        raise CheckpointMismatchError(
            f"config.json says tie_word_embeddings=false but the weights have no {LM_HEAD}; set "
            f"tie_word_embeddings to true if the output layer shares {EMBEDDING}")


def check_state_dict(shapes: dict[str, Sequence[int]], expected: dict[str, Sequence[int]],
                     what: str = "config.json") -> None:
    """Refuse missing keys, unexpected keys and shape differences (experts in canonical layout)."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys the config requires: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys the config does not have: {_listing(unexpected)}")
    for name in sorted(set(shapes) & set(expected)):
        if tuple(shapes[name]) != tuple(expected[name]):
            problems.append(f"{name}: checkpoint shape {list(shapes[name])} but the config "
                            f"implies {list(expected[name])}")
    if problems:
        raise CheckpointMismatchError(
            f"the weights do not match {what}:\n  " + "\n  ".join(problems[:20])
            + ("\n  ..." if len(problems) > 20 else ""))


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def canonical_layout(specs: dict[str, TensorSpec], config: dict,
                     expected: dict[str, torch.Size]) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Canonical shapes of the stored tensors and the expert layout found; refuses a mix of layouts."""
    layouts = set()
    shapes = {name: spec.shape for name, spec in specs.items()}
    for name, spec in specs.items():
        if _is_expert_key(name) and name in expected:
            layout = _expert_tensor_layout(name, spec.shape, expected[name], config)
            layouts.add(layout)
            if layout == RELEASE_LAYOUT:
                shapes[name] = _transposed(spec.shape)
    if len(layouts) > 1:
        raise CheckpointMismatchError(
            "the expert tensors mix the release ([E, H, 2I]) and transformers 5.x ([E, 2I, H]) "
            "layouts; re-save the checkpoint with one layout")
    return shapes, (layouts.pop() if layouts else None)


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(directory: str | os.PathLike, flag: str = "--hf") -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {flag} must be a Hugging Face model "
                                f"directory with config.json and safetensors weights")
    return json.loads(path.read_text())


def open_hf_checkpoint(directory: str | os.PathLike) -> HFCheckpoint:
    """Read config.json and the safetensors headers, and check them against each other (no tensor data)."""
    config = read_config(directory)
    expected = expected_hf_shapes(config)  # also refuses non-Qwen3-VL configs
    specs = read_index(directory)
    check_tied_embeddings(specs, config)
    shapes, layout = canonical_layout(specs, config, expected)
    check_state_dict(shapes, expected)
    return HFCheckpoint(directory=Path(directory), config=config, tensors=specs, expert_layout=layout)


# ---------------------------------------------------------------------------------------------
# Writing

Producer = Callable[[Sequence[str]], Sequence[torch.Tensor]]


def write_hf_checkpoint(directory: str | os.PathLike, config: dict, groups: Sequence[Sequence[str]],
                        produce: Producer, dtype: torch.dtype, *, expert_layout: str = HF5_LAYOUT,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, workers: int = 1) -> Path:
    """Write a directory that ``from_pretrained`` loads, tensor by tensor.

    ``groups`` lists every HF name once, in groups that ``produce(group)`` returns together (canonical
    layout); a group stays in one file. Shapes come from ``config`` (checked first); ``workers`` files
    are written at once (``produce`` must then be thread-safe). config.json is written last, so a
    directory with one is complete."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {expert_layout!r} is not one of {EXPERT_LAYOUTS}")
    names = [name for group in groups for name in group]
    check_tied_embeddings(names, config)
    expected = expected_hf_shapes(config)
    check_state_dict({name: expected.get(name, ()) for name in names}, expected)
    release = expert_layout == RELEASE_LAYOUT

    def stored(name: str) -> TensorSpec:
        shape = tuple(expected[name])
        return TensorSpec(name, _transposed(shape) if release and _is_expert_key(name) else shape, dtype)

    shards = plan_shards([[stored(name) for name in group] for group in groups], max_shard_bytes)
    group_of = {name: tuple(group) for group in groups for name in group}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).unlink(missing_ok=True)

    def tensors(shard: list[TensorSpec]):
        pending: dict[str, torch.Tensor] = {}
        for spec in shard:
            if spec.name not in pending:
                group = group_of[spec.name]
                pending.update(zip(group, produce(group)))
            tensor = pending.pop(spec.name).to(dtype)
            yield tensor.transpose(1, 2) if release and _is_expert_key(spec.name) else tensor

    def write(shard: list[TensorSpec]) -> None:
        write_file(directory / shard[0].file, shard, tensors(shard))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(write, shards))
    write_index(directory, shards)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
