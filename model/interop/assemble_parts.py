"""The two pretrained parts ``qwen3vl-convert assemble`` reads: a Qwen3 / Qwen3-MoE causal LM and a SigLIP-2
vision tower, as Hugging Face directories, checked against transformers before any tensor is read.

* LLM: ``model_type`` ``qwen3`` or ``qwen3_moe`` (``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM``). The
  MoE files store one tensor per expert (``mlp.experts.{e}.gate_proj.weight`` ...), both on the hub and
  as transformers 5.x's ``save_pretrained`` writes them; a tied LLM (Qwen3-1.7B, Qwen3-4B) has no
  ``lm_head.weight``.
* Vision: ``Siglip2VisionModel`` / ``SiglipVisionModel``, or the vision tower inside a full SigLIP-2
  checkpoint (``Siglip2Model`` / ``SiglipModel``; the fixed-resolution SigLIP-2 releases use the SigLIP
  classes, the NaFlex ones the SigLIP-2 classes: they differ only in the patch embedding, a Linear over
  (row, column, channel) or a Conv2d). Its weights sit under ``vision_model.`` in full checkpoints and
  vision towers saved by transformers 4.x, at the top level in those saved by 5.x.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen3vl.model.interop.hf_checkpoint import (CheckpointMismatchError, check_model_type, check_state_dict,
                                                 read_config)
from qwen3vl.model.interop.safetensors_files import TensorSpec, read_index, read_tensor, stored_dtype
from qwen3vl.model.interop.transformers_models import transformers_config_and_class, transformers_shapes

LLM_TYPES = ("qwen3", "qwen3_moe")
VISION_TYPES = ("siglip2", "siglip2_vision_model", "siglip", "siglip_vision_model")
_PATCH = "embeddings.patch_embedding.weight"


@dataclass
class Part:
    """One pretrained part: its config (for a vision tower, the vision config) and its tensors on disk."""

    directory: Path
    config: dict
    tensors: dict[str, TensorSpec]
    prefix: str = ""  # where the vision tower's weights start ("vision_model." or "")

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.directory, self.tensors[name])

    @property
    def dtype(self) -> torch.dtype:
        return stored_dtype(self.tensors.values())


def _tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def open_llm(directory: str | os.PathLike) -> Part:
    """A Qwen3 / Qwen3-MoE causal-LM directory, its names and shapes checked against transformers'."""
    config = read_config(directory, flag="--llm")
    check_model_type(config, LLM_TYPES, "--llm must be a Qwen3 or Qwen3-MoE causal LM", f"{directory}/config.json")
    config = dict(transformers_config_and_class(config)[0].to_dict(), **config)  # defaults filled in
    expected = {}
    for name, shape in transformers_shapes(config).items():
        if name.endswith("mlp.experts.gate_up_proj"):  # fused in memory, one tensor per expert on disk
            head = name[: -len("gate_up_proj")]
            for e in range(shape[0]):
                expected[f"{head}{e}.gate_proj.weight"] = (shape[1] // 2, shape[2])
                expected[f"{head}{e}.up_proj.weight"] = (shape[1] // 2, shape[2])
        elif name.endswith("mlp.experts.down_proj"):
            head = name[: -len("down_proj")]
            expected.update({f"{head}{e}.down_proj.weight": tuple(shape[1:]) for e in range(shape[0])})
        else:
            expected[name] = tuple(shape)
    specs = read_index(directory)
    if _tied(config):
        expected.pop("lm_head.weight", None)
        specs = {k: v for k, v in specs.items() if k != "lm_head.weight"}  # some tied releases store a copy
    check_state_dict({k: v.shape for k, v in specs.items()}, expected, what=f"{directory}/config.json")
    return Part(Path(directory), config, specs)


def _prefix(names, directory) -> str:
    found = {name[: -len(_PATCH)] for name in names if name.endswith(_PATCH) and "text_model" not in name}
    if len(found) != 1:
        raise CheckpointMismatchError(f"{directory} holds {len(found)} vision patch embeddings (…{_PATCH}); "
                                      "--vision must be one SigLIP-2 checkpoint")
    return found.pop()


def open_vision(directory: str | os.PathLike) -> Part:
    """A SigLIP-2 (or SigLIP) directory, full or vision tower only, checked against transformers'."""
    config = read_config(directory, flag="--vision")
    check_model_type(config, VISION_TYPES, "--vision must be a SigLIP-2 checkpoint", f"{directory}/config.json")
    model_type = config["model_type"]
    specs = read_index(directory)
    expected = transformers_shapes(config)
    # transformers' in-memory names and the file's may differ by the vision_model. prefix: compare relatively.
    ours, theirs = _prefix(specs, directory), _prefix(expected, "transformers' model")
    relative = {name[len(theirs):]: shape for name, shape in expected.items() if name.startswith(theirs)}
    stored = {name[len(ours):]: spec.shape for name, spec in specs.items() if name.startswith(ours)}
    if model_type in ("siglip2", "siglip"):
        stored = {k: v for k, v in stored.items() if not k.startswith("text_model.")}
        relative = {k: v for k, v in relative.items() if not k.startswith("text_model.")}
    check_state_dict(stored, relative, what=f"{directory}/config.json")
    # transformers' config object fills in the defaults a config.json may leave out.
    hf_config, _ = transformers_config_and_class(config)
    vision_config = hf_config.vision_config if model_type in ("siglip2", "siglip") else hf_config
    return Part(Path(directory), vision_config.to_dict(), specs, prefix=ours)
