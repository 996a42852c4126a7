"""Which parameters train, and the optimizer's parameter groups (per-part lr, no decay on norms/biases).

Parts, by parameter name (megatron module names of ``qwen3vl.model``):

* ``merger``  — the 2×2 patch merger and the three DeepStack mergers (names containing ``merger``);
* ``vision``  — the rest of the vision tower (names under ``vision``);
* ``llm``     — everything else (embeddings, decoder, output layer).

Stage 0 trains only ``merger`` (``trainable=["merger"]``; the names ``deepstack_merger`` and
``merger`` are accepted, both mean the merger part). Frozen parameters get ``requires_grad=False``
*before* megatron's DDP wraps the model, so they get no gradient buffer and no optimizer state.

The groups are megatron ``config_overrides`` (``get_megatron_optimizer(config, chunks,
config_overrides=...)`` in 0.16.1): each part gets its own ``max_lr``/``min_lr``, which megatron's
``OptimizerParamScheduler`` follows per group, and 1-D parameters (norm weights) and biases get
``wd_mult=0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

PARTS = ("vision", "merger", "llm")
_ALIASES = {"merger": "merger", "deepstack_merger": "merger", "mergers": "merger", "vision": "vision",
            "llm": "llm"}


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its (possibly DDP-prefixed) name."""
    parts = name.split(".")
    if any("merger" in p for p in parts):
        return "merger"
    if any(p.startswith("vision") for p in parts):
        return "vision"
    return "llm"


def trainable_parts(trainable: str | Sequence[str]) -> set[str]:
    """``"all"`` or a list of part names -> the set of parts (raises with the accepted names)."""
    if isinstance(trainable, str):
        trainable = list(PARTS) if trainable == "all" else [trainable]
    unknown = [t for t in trainable if t not in _ALIASES and t != "all"]
    if unknown:
        raise ValueError(f"unknown trainable part(s) {unknown}; use 'all' or some of {sorted(_ALIASES)}")
    if "all" in trainable:
        return set(PARTS)
    return {_ALIASES[t] for t in trainable}


def apply_freeze(model_chunks: Iterable[torch.nn.Module], trainable: str | Sequence[str]) -> dict[str, int]:
    """Sets ``requires_grad`` by part; returns the number of trainable elements per part (this rank)."""
    parts = trainable_parts(trainable)
    counts = {p: 0 for p in PARTS}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            part = part_of(name)
            param.requires_grad_(part in parts)
            if part in parts:
                counts[part] += param.numel()
    return counts


@dataclass(frozen=True)
class PartLR:
    """Peak and final learning rate of one part."""

    max_lr: float
    min_lr: float


def no_decay(param: torch.nn.Parameter, name: str) -> bool:
    """Norm weights (1-D) and biases get no weight decay."""
    return param.dim() == 1 or name.endswith(".bias")


def param_group_overrides(part_lrs: dict[str, PartLR]) -> dict:
    """megatron ``config_overrides``: per-part lrs and no decay on norms and biases.

    Overrides matching the same parameter are merged by megatron, so a norm of the merger gets the
    merger's lrs *and* ``wd_mult=0``.
    """
    from megatron.core.optimizer import ParamKey  # lazy: qwen3vl-plan imports this module without megatron
    from megatron.core.optimizer.optimizer_config import (  # lazy: qwen3vl-plan imports this without megatron
        ParamWithNamePredicate)

    unknown = set(part_lrs) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)} in the learning rates; parts are {PARTS}")
    overrides = {
        ParamKey(with_name_predicate=ParamWithNamePredicate(name="no_decay", fn=no_decay)): {"wd_mult": 0.0},
    }
    for part, lr in part_lrs.items():
        predicate = ParamWithNamePredicate(name=f"part_{part}", fn=lambda p, n, part=part: part_of(n) == part)
        overrides[ParamKey(with_name_predicate=predicate)] = {"max_lr": float(lr.max_lr), "min_lr": float(lr.min_lr)}
    return overrides
