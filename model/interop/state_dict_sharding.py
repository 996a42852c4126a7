"""Cut a full (TP = PP = EP = 1) state dict of ``Qwen3VLModel`` down to what one rank holds, and load it.

Which rank holds what is read from the parameters themselves (megatron marks tensor-parallel weights with
``tensor_model_parallel`` and ``partition_dim``) and from the model's structure:
  * pipeline: local ``decoder.layers.k`` is global layer ``layer_number - 1``;
  * experts: local expert k of expert-parallel rank r is global expert r·E_local + k; expert weights are
    split over the *expert* tensor-parallel group;
  * SwiGLU ``linear_fc1`` holds cat(gate, up): rank r takes cat(gate_r, up_r), since megatron splits
    the local output in two halves;
  * a tied output layer on a last stage without the embedding takes the embedding's rows.
"""
from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def _global_name(model: torch.nn.Module, name: str) -> str:
    match = _LAYER.match(name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
    match = _EXPERT.search(name)
    if match:
        local = int(match.group(1))
        num_local = _num_local_experts(model)
        expert = parallel_state.get_expert_model_parallel_rank() * num_local + local
        name = name[:match.start()] + f".local_experts.{expert}." + name[match.end():]
    return name


def _num_local_experts(model: torch.nn.Module) -> int:
    for layer in model.decoder.layers:
        experts = getattr(getattr(layer.mlp, "experts", None), "local_experts", None)
        if experts is not None:
            return len(experts)
    raise ValueError("model has no expert layers")


def _tp_slice(name: str, param: torch.Tensor, full: torch.Tensor, glu: bool) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    expert = ".local_experts." in name
    rank = (parallel_state.get_expert_tensor_parallel_rank() if expert
            else parallel_state.get_tensor_model_parallel_rank())
    size = (parallel_state.get_expert_tensor_parallel_world_size() if expert
            else parallel_state.get_tensor_model_parallel_world_size())
    dim = param.partition_dim
    if glu and name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def shard_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's parameters, cut from ``full``; raises KeyError naming any parameter ``full`` lacks."""
    glu = model.config.gated_linear_unit
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    out = {}
    for name, param in model.named_parameters():
        key = _global_name(model, name)
        glu_here = glu and not name.startswith("vision.")  # the ViT MLP is not gated
        if key not in full and key == "output_layer.weight" and tied:
            key = "embedding.word_embeddings.weight"
        if key not in full:
            raise KeyError(f"the full state dict has no {key!r} (needed by parameter {name!r})")
        value = _tp_slice(name, param, full[key], glu_here)
        if value.shape != param.shape:
            raise ValueError(f"{name}: cut {list(value.shape)} from {key} {list(full[key].shape)}, "
                             f"parameter is {list(param.shape)}")
        out[name] = value
    return out


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's share of ``full`` into the model's parameters (in place, keeping their dtype)."""
    local = shard_full_state_dict(model, full)
    for name, param in model.named_parameters():
        param.copy_(local[name])
