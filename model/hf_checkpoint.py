"""Hugging Face Qwen3-VL checkpoint directories on disk: read, check against the config, write.

A directory holds ``config.json`` plus the weights as one ``model.safetensors`` or as shards listed
in ``model.safetensors.index.json``. This module only moves tensors between disk and a flat
``{hf_name: tensor}`` dict in one *canonical* form, the transformers 5.x in-memory layout; the
name mapping to our megatron model lives in ``qwen3vl.model.hf_weights``.

Two on-disk quirks are absorbed here (qwen3vl_model_spec.md §3, §8):

* MoE experts. The original release stores ``mlp.experts.gate_up_proj`` as ``[E, H, 2I]`` and
  ``down_proj`` as ``[E, I, H]``; transformers 5.x (and its ``save_pretrained``) uses the
  transposes ``[E, 2I, H]`` / ``[E, H, I]``. Both are accepted, detected by shape; when a tensor is
  square in the last two dims the shape cannot tell, and the ``transformers_version`` that wrote
  ``config.json`` decides (releases were written by 4.x).
* Tied embeddings (2B, 4B). The top-level ``tie_word_embeddings`` decides; a tied checkpoint has
  no ``lm_head.weight`` and an untied one must have it.

Every other disagreement between the weights and the config (missing or unexpected keys, shapes)
is refused with a ``CheckpointMismatchError`` naming the key and both shapes. The expected names
and shapes come from transformers itself: the model class is instantiated on the meta device.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.language_model.embed_tokens.weight"
# Expert tensors have no ".weight" suffix in either layout.
EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Layout names, as accepted by ``save_hf_checkpoint(expert_layout=...)`` and the CLI.
HF5_LAYOUT, RELEASE_LAYOUT = "hf5", "release"
EXPERT_LAYOUTS = (HF5_LAYOUT, RELEASE_LAYOUT)
# Shards are cut below this size by default (what transformers does too).
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


class CheckpointMismatchError(ValueError):
    """The weights do not fit the config (or the config is not a Qwen3-VL one)."""


@dataclass
class HFCheckpoint:
    config: dict  # the config.json contents, untouched
    state_dict: dict[str, torch.Tensor]  # canonical transformers 5.x layout, no lm_head when tied
    expert_layout: str | None  # layout found on disk: "hf5", "release", or None (dense model)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most weights are stored in (what an export should write back)."""
        counts: dict[torch.dtype, int] = {}
        for tensor in self.state_dict.values():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
        return max(counts, key=counts.get)


# ---------------------------------------------------------------------------------------------
# Expected names and shapes, from transformers


def _transformers_config(config: dict):
    """The transformers config object for a config.json dict (legacy keys are upgraded by it)."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise CheckpointMismatchError(
            f"config.json has model_type={model_type!r}; only Qwen3-VL checkpoints "
            f"({' or '.join(_MODEL_TYPES)}) can be converted")
    rest = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **rest)


def _transformers_class(config: dict):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    if config.get("model_type") == "qwen3_vl_moe":
        return Qwen3VLMoeForConditionalGeneration
    return Qwen3VLForConditionalGeneration


def expected_hf_shapes(config: dict) -> dict[str, torch.Size]:
    """Every key a checkpoint for ``config`` must hold, with its canonical (5.x) shape."""
    config_object = _transformers_config(config)
    with torch.device("meta"):
        model = _transformers_class(config)(config_object)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if config.get("tie_word_embeddings", False):
        shapes.pop(LM_HEAD, None)
    return shapes


def our_config(config: dict, name: str = "hf"):
    """Our ``Qwen3VLConfig`` for a config.json dict (release or transformers 5.x spelling)."""
    from qwen3vl.model.hf_config import config_from_hf

    return config_from_hf(config, name=name)


# ---------------------------------------------------------------------------------------------
# Checking and layout normalisation


def _is_expert_key(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def _written_by_transformers_4(config: dict) -> bool:
    version = str(config.get("transformers_version", ""))
    return version.split(".")[0].isdigit() and int(version.split(".")[0]) < 5


def _expert_tensor_layout(name: str, shape: torch.Size, expected: torch.Size, config: dict) -> str:
    transposed = torch.Size([expected[0], expected[2], expected[1]])
    if shape == expected and shape == transposed:
        return RELEASE_LAYOUT if _written_by_transformers_4(config) else HF5_LAYOUT
    if shape == expected:
        return HF5_LAYOUT
    if shape == transposed:
        return RELEASE_LAYOUT
    raise CheckpointMismatchError(
        f"{name}: checkpoint shape {list(shape)} fits neither expert layout the config implies: "
        f"transformers 5.x {list(expected)} or release {list(transposed)}; check num_experts, "
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


def check_state_dict(shapes: dict[str, torch.Size], expected: dict[str, torch.Size]) -> None:
    """Refuse missing keys, unexpected keys and shape differences (experts in canonical layout)."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys the config requires: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys the config does not have: {_listing(unexpected)}")
    for name in sorted(set(shapes) & set(expected)):
        if shapes[name] != expected[name]:
            problems.append(f"{name}: checkpoint shape {list(shapes[name])} but the config "
                            f"implies {list(expected[name])}")
    if problems:
        raise CheckpointMismatchError(
            "the weights do not match config.json:\n  " + "\n  ".join(problems[:20])
            + ("\n  ..." if len(problems) > 20 else ""))


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def to_canonical_layout(state_dict: dict[str, torch.Tensor], config: dict,
                        expected: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Transpose release-layout experts into the 5.x layout; returns (state dict, layout found)."""
    layouts = set()
    out = dict(state_dict)
    for name, tensor in state_dict.items():
        if not _is_expert_key(name) or name not in expected:
            continue
        layout = _expert_tensor_layout(name, tensor.shape, expected[name], config)
        layouts.add(layout)
        if layout == RELEASE_LAYOUT:
            out[name] = tensor.transpose(1, 2).contiguous()
    if len(layouts) > 1:
        raise CheckpointMismatchError(
            "the expert tensors mix the release ([E, H, 2I]) and transformers 5.x ([E, 2I, H]) "
            "layouts; re-save the checkpoint with one layout")
    return out, (layouts.pop() if layouts else None)


def to_expert_layout(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """From the canonical layout to ``layout`` ("hf5": unchanged, "release": transposed experts)."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {EXPERT_LAYOUTS}")
    if layout == HF5_LAYOUT:
        return dict(state_dict)
    return {name: tensor.transpose(1, 2).contiguous() if _is_expert_key(name) else tensor
            for name, tensor in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --hf must be a Hugging Face model "
                                f"directory with config.json and safetensors weights")
    return json.loads(path.read_text())


def read_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        state_dict: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_file(directory / shard)
            listed = {name for name, file in weight_map.items() if file == shard}
            if set(tensors) != listed:
                raise CheckpointMismatchError(
                    f"{directory / shard} holds {_listing(sorted(set(tensors) ^ listed))} "
                    f"differently from {INDEX_FILE}; the checkpoint is incomplete or corrupt")
            state_dict.update(tensors)
        return state_dict
    if (directory / SINGLE_FILE).is_file():
        return load_file(directory / SINGLE_FILE)
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; only "
                            f"safetensors weights are supported")


def load_hf_checkpoint(directory: str | os.PathLike) -> HFCheckpoint:
    """Read, check against config.json, and bring experts into the canonical layout."""
    config = read_config(directory)
    expected = expected_hf_shapes(config)  # also refuses non-Qwen3-VL configs, before the big read
    raw = read_safetensors(directory)
    check_tied_embeddings(raw, config)
    state_dict, layout = to_canonical_layout(raw, config, expected)
    check_state_dict({name: t.shape for name, t in state_dict.items()}, expected)
    return HFCheckpoint(config=config, state_dict=state_dict, expert_layout=layout)


# ---------------------------------------------------------------------------------------------
# Writing


def save_hf_checkpoint(directory: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor],
                       *, expert_layout: str = HF5_LAYOUT,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Check ``state_dict`` (canonical layout) against ``config`` and write a directory that
    ``from_pretrained`` loads: config.json plus one safetensors file, or shards and an index."""
    from safetensors.torch import save_file

    check_tied_embeddings(state_dict, config)
    check_state_dict({name: t.shape for name, t in state_dict.items()}, expected_hf_shapes(config))
    tensors = to_expert_layout(state_dict, expert_layout)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(_storable(tensors, shards[0]), directory / SINGLE_FILE, metadata=metadata)
        stale = directory / INDEX_FILE
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(_storable(tensors, names), directory / file, metadata=metadata)
            weight_map.update({name: file for name in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        stale = directory / SINGLE_FILE
    # A leftover file of the other kind would make loaders read the wrong weights.
    stale.unlink(missing_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _storable(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and shared storage; a contiguous copy of each tensor is enough.
    return {name: tensors[name].detach().cpu().contiguous().clone() for name in names}
