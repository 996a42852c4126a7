"""Declare-once weight tables: each weight (or group of weights one transform fuses) is one ``Weight`` entry
with wildcards, and both directions of a conversion derive from it.

Wildcards, expanded from the architecture config:

    {n}  ViT block             0 .. vision.depth - 1
    {j}  DeepStack merger      0 .. number of DeepStack layers - 1
    {i}  LLM decoder layer     0 .. text.num_layers - 1 (``layers`` picks all, the dense or the MoE ones)
    {e}  expert of a layer     0 .. text.num_experts - 1

A wildcard on both sides gives one mapping per value. A wildcard on one side only gives one mapping whose
names on that side are the whole list (HF stores a layer's experts as one fused tensor, we as one
tensor per expert), so its transform sees all of them at once. A ``Transform`` holds both directions of
one re-arrangement; none of them does arithmetic except where a source format demands it (assembling
from SigLIP-2), so Qwen3-VL round trips are bitwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from typing import Callable, Sequence

import torch

from qwen3vl.model.config import Qwen3VLConfig

Tensors = Sequence[torch.Tensor]
_WILDCARD = re.compile(r"\{([nije])\}")


class Transform:
    """One re-arrangement, both ways. ``theirs``/``ours`` are the tensors of one mapping, in its order."""

    def to_ours(self, theirs: Tensors, config: Qwen3VLConfig) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_theirs(self, ours: Tensors, config: Qwen3VLConfig) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} converts into our layout only")


class Copy(Transform):
    def to_ours(self, theirs, config):
        return list(theirs)

    def to_theirs(self, ours, config):
        return list(ours)


@dataclass(frozen=True)
class Weight:
    """One table entry: our name(s), their name(s), the transform, and where it applies."""

    ours: str | tuple[str, ...]
    theirs: str | tuple[str, ...]
    transform: Transform = Copy()
    layers: str = "all"  # which LLM layers {i} ranges over: "all", "dense" or "moe"
    when: Callable[[Qwen3VLConfig], bool] | None = None  # the entry exists only where this holds


@dataclass(frozen=True)
class Mapping:
    """A table entry with every wildcard filled in."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transform: Transform


def _ranges(config: Qwen3VLConfig, layers: str) -> dict[str, range | list[int]]:
    t = config.text
    llm = [i for i in range(t.num_layers)
           if layers == "all" or (layers == "moe") == t.is_moe_layer(i)]
    return {"n": range(config.vision.depth), "j": range(config.num_deepstack_layers), "i": llm,
            "e": range(t.num_experts or 0)}


def _fill(names: tuple[str, ...], values: dict[str, int], lists: dict[str, Sequence[int]]) -> tuple[str, ...]:
    """Fill ``values`` in; a wildcard in ``lists`` repeats each name once per value (in order)."""
    out: list[str] = []
    for name in names:
        own = [w for w in dict.fromkeys(_WILDCARD.findall(name)) if w in lists]
        for combo in product(*(lists[w] for w in own)):
            filled = dict(values, **dict(zip(own, combo)))
            out.append(_WILDCARD.sub(lambda m: str(filled[m.group(1)]), name))
    return tuple(out)


def expand(table: Sequence[Weight], config: Qwen3VLConfig) -> list[Mapping]:
    """Every mapping of ``table`` for ``config``, in table order."""
    mappings = []
    for weight in table:
        if weight.when is not None and not weight.when(config):
            continue
        ours = (weight.ours,) if isinstance(weight.ours, str) else weight.ours
        theirs = (weight.theirs,) if isinstance(weight.theirs, str) else weight.theirs
        wild_ours = {w for name in ours for w in _WILDCARD.findall(name)}
        wild_theirs = {w for name in theirs for w in _WILDCARD.findall(name)}
        ranges = _ranges(config, weight.layers)
        shared = sorted(wild_ours & wild_theirs)
        lists = {w: ranges[w] for w in wild_ours ^ wild_theirs}
        for combo in product(*(ranges[w] for w in shared)):
            values = dict(zip(shared, combo))
            mappings.append(Mapping(_fill(ours, values, lists), _fill(theirs, values, lists), weight.transform))
    return mappings


def _convert(mappings: Sequence[Mapping], tensors: dict[str, torch.Tensor], config: Qwen3VLConfig,
             into_ours: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m in mappings:
        source, target = (m.theirs, m.ours) if into_ours else (m.ours, m.theirs)
        transform = m.transform.to_ours if into_ours else m.transform.to_theirs
        out.update(zip(target, transform([tensors[n] for n in source], config)))
    return {k: v.contiguous() for k, v in out.items()}


def to_ours(mappings: Sequence[Mapping], theirs: dict[str, torch.Tensor], config: Qwen3VLConfig
            ) -> dict[str, torch.Tensor]:
    """A whole state dict, their names -> ours (small models and tests; conversions stream per mapping)."""
    return _convert(mappings, theirs, config, into_ours=True)


def to_theirs(mappings: Sequence[Mapping], ours: dict[str, torch.Tensor], config: Qwen3VLConfig
              ) -> dict[str, torch.Tensor]:
    """The inverse of ``to_ours``."""
    return _convert(mappings, ours, config, into_ours=False)
