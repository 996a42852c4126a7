"""Exact parameter counts per rank of a layout, from the model built on the meta device.

Nothing is allocated: megatron's process groups live in a fake process group (torch's ``fake``
backend: collectives do nothing) and the model chunks are built on ``torch.device("meta")``. Counts
depend on the tensor, expert and pipeline split only (CP and DP ranks hold replicas), so the ranks of a
layout fall into a few *roles*: the pipeline ranks, and among them those holding the same layers.

Two ways, which must agree (the test checks them against each other):

* ``build_roles``: every distinct role built as the training builds it (``qwen3vl.model.build``) in a
  fake world of the full size, at a global rank of that role. Seconds per role.
* ``RoleCounter``: the same modules counted once per tensor/expert split and added up per stage (the
  first stage's embedding and vision tower, each layer kind, the last stage's head), so that hundreds of
  candidate layouts cost a few builds.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
# torch's fake backend ships in its testing package; importing it registers the "fake" backend.
from torch.testing._internal.distributed.fake_pg import FakeStore

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.parallel import cpu_backend
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.train.freeze import part_of, trainable_parts


@dataclass
class RankParams:
    """The parameters one rank holds: all of them, the trained ones (grads + optimizer state), and of
    those the experts' (their ZeRO-1 shard is over the expert data-parallel group)."""

    total: int = 0
    trained: int = 0
    trained_expert: int = 0
    by_part: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "RankParams") -> "RankParams":
        parts = dict(self.by_part)
        for k, v in other.by_part.items():
            parts[k] = parts.get(k, 0) + v
        return RankParams(self.total + other.total, self.trained + other.trained,
                          self.trained_expert + other.trained_expert, parts)

    def scaled(self, n: int) -> "RankParams":
        return RankParams(self.total * n, self.trained * n, self.trained_expert * n,
                          {k: v * n for k, v in self.by_part.items()})


def _is_expert(p: torch.nn.Parameter) -> bool:
    return not getattr(p, "allreduce", True)  # megatron marks expert parameters allreduce=False


def count_modules(modules: Sequence[torch.nn.Module], trainable: Sequence[str] | str,
                  experts_only: bool = False) -> RankParams:
    parts = trainable_parts(trainable)
    out = RankParams()
    for module in modules:
        for name, p in module.named_parameters():
            if experts_only and not _is_expert(p):
                continue
            part = part_of(name)
            out.by_part[part] = out.by_part.get(part, 0) + p.numel()
            out.total += p.numel()
            if part in parts:
                out.trained += p.numel()
                if _is_expert(p):
                    out.trained_expert += p.numel()
    return out


# ---- a fake world ---------------------------------------------------------------------------------

@contextlib.contextmanager
def fake_world(world_size: int, rank: int, layout: ParallelLayout) -> Iterator[None]:
    """megatron's parallel state for ``layout`` as seen by global rank ``rank`` of ``world_size``, in a
    fake process group (no communication, no memory). Needs a process without torch.distributed."""
    from megatron.core import parallel_state  # lazy: megatron takes seconds; only to build a model

    if dist.is_initialized():
        raise RuntimeError("the planner needs a process without torch.distributed (run qwen3vl-plan on its own)")
    cpu_backend.enable()  # megatron's CUDA-only calls (streams in the MoE dispatcher) work on meta/CPU
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
            create_gloo_process_groups=False)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _meta_chunks(config: Qwen3VLConfig, layout: ParallelLayout):
    from qwen3vl.model.build import build_model_chunks  # lazy: megatron takes seconds; only to build a model

    meta = torch.device("meta")
    with meta:
        return build_model_chunks(config, torch.bfloat16, layout.pipeline_layers, device=meta,
                                  perform_initialization=False, use_cpu_initialization=True,
                                  sequence_parallel=layout.sequence_parallel)


# ---- every role built as training builds it -------------------------------------------------------

def role_signature(config: Qwen3VLConfig, layout: ParallelLayout, rank: int) -> tuple:
    """What pipeline rank ``rank`` builds: per chunk, first/last stage and the kind of each layer."""
    stages = layout.stage_layers(config.text.num_layers)
    signature = []
    for chunk in range(layout.vpp or 1):
        index = chunk * layout.pp + rank
        start = sum(stages[:index])
        kinds = tuple(config.text.is_moe_layer(i) for i in range(start, start + stages[index]))
        signature.append((index == 0, index == len(stages) - 1, kinds))
    return tuple(signature)


def build_roles(config: Qwen3VLConfig, layout: ParallelLayout, world_size: int, trainable) -> list[RankParams]:
    """Exact counts of every pipeline rank, each distinct one built in a fake world of ``world_size``
    ranks at the global rank of its first TP/CP/EP/DP peer (pipeline stages are the outermost split)."""
    built: dict[tuple, RankParams] = {}
    out = []
    for rank in range(layout.pp):
        signature = role_signature(config, layout, rank)
        if signature not in built:
            with fake_world(world_size, rank * (world_size // layout.pp), layout):
                built[signature] = count_modules(_meta_chunks(config, layout), trainable)
        out.append(built[signature])
    return out


# ---- the same, from counted pieces ----------------------------------------------------------------

class RoleCounter:
    """Per-rank counts of many layouts of one model from a few meta builds, cached by split."""

    def __init__(self, config: Qwen3VLConfig, trainable) -> None:
        self.config = config
        self.trainable = trainable
        self._cache: dict[tuple, RankParams] = {}

    def _dense(self) -> Qwen3VLConfig:
        return replace(self.config, text=replace(self.config.text, num_experts=0, num_experts_per_tok=0,
                                                 moe_intermediate_size=0))

    def _build(self, key: tuple, config_fn, layout: ParallelLayout, layers: int, pre: bool, post: bool,
               experts_only: bool = False) -> RankParams:
        if experts_only:
            self._build(key, config_fn, layout, layers, pre, post)
            return self._cache[key + ("experts",)]
        if key not in self._cache:
            from qwen3vl.model.qwen3vl import Qwen3VLModel  # lazy: megatron takes seconds; only to build a model
            from qwen3vl.model.transformer_configs import (  # lazy: megatron takes seconds; only to build a model
                text_transformer_config, vision_transformer_config)

            config = config_fn()
            small = replace(config, text=replace(config.text, num_layers=layers))
            world = math.lcm(layout.tp, layout.expert_tp * layout.ep)  # the smallest world for this split
            with fake_world(world, 0, replace(layout, pp=1, vpp=None, cp=1, pipeline_layers=None)):
                with torch.device("meta"):
                    text = text_transformer_config(small, torch.bfloat16, perform_initialization=False,
                                                   use_cpu_initialization=True,
                                                   sequence_parallel=layout.sequence_parallel)
                    vision = vision_transformer_config(small, torch.bfloat16, perform_initialization=False,
                                                       use_cpu_initialization=True)
                    chunk = Qwen3VLModel(small, text, vision, pre_process=pre, post_process=post)
            self._cache[key] = count_modules([chunk], self.trainable)
            self._cache[key + ("experts",)] = count_modules([chunk], self.trainable, experts_only=True)
        return self._cache[key]

    def _layer(self, tp: int, sp: bool, moe: bool, etp: int = 1, ep: int = 1) -> RankParams:
        if moe:
            # Built with one expert per rank (ep = experts); local experts are identical modules, so
            # ep ranks hold experts/ep of them.
            experts = self.config.text.num_experts
            layout = ParallelLayout(tp=tp, ep=experts, etp=etp, sequence_parallel=sp)
            key = ("moe", tp, etp, sp)
            layer = self._build(key, lambda: self.config, layout, 1, False, False)
            one_expert = self._build(key, lambda: self.config, layout, 1, False, False, experts_only=True)
            counts = layer + one_expert.scaled(experts // ep - 1)
            # megatron treats experts as dense parameters (DP-reduced, in the dense optimizer) unless ep > 1
            return counts if ep > 1 else replace(counts, trained_expert=0)
        return self._build(("dense", tp, sp), self._dense, ParallelLayout(tp=tp, sequence_parallel=sp), 1,
                           False, False)

    def _ends(self, tp: int, sp: bool) -> tuple[RankParams, RankParams, RankParams]:
        """(first stage's extras, last stage's extras alone, last stage's extras on the first stage)."""
        key = ("ends", tp, sp)
        if key not in self._cache:
            dense = ParallelLayout(tp=tp, sequence_parallel=sp)
            n = max(self.config.num_deepstack_layers, 1)  # the first stage must hold the DeepStack layers
            layer = self._layer(tp, sp, False)
            pre = self._build(("pre", tp, sp), self._dense, dense, n, True, False)
            both = self._build(("both", tp, sp), self._dense, dense, n, True, True)
            post = self._build(("post", tp, sp), self._dense, dense, 1, False, True)
            first = _minus(pre, layer.scaled(n))
            self._cache[key] = (first, _minus(post, layer), _minus(_minus(both, layer.scaled(n)), first))
        return self._cache[key]

    def roles(self, layout: ParallelLayout) -> list[RankParams]:
        """Counts of every pipeline rank of ``layout`` (its even or explicit split of the layers)."""
        text = self.config.text
        stages = layout.stage_layers(text.num_layers)
        tp, sp = layout.tp, layout.sequence_parallel
        first, last_alone, last_with_first = self._ends(tp, sp)
        vpp = layout.vpp or 1
        out = []
        for rank in range(layout.pp):
            total = RankParams()
            for chunk in range(vpp):
                index = chunk * layout.pp + rank  # virtual stage index in model order
                start = sum(stages[:index])
                moe = sum(text.is_moe_layer(i) for i in range(start, start + stages[index]))
                total = total + self._layer(tp, sp, False).scaled(stages[index] - moe)
                if moe:
                    total = total + self._layer(tp, sp, True, layout.expert_tp, layout.ep).scaled(moe)
                is_first, is_last = index == 0, index == len(stages) - 1
                if is_first:
                    total = total + first
                if is_last:
                    total = total + (last_with_first if is_first else last_alone)
            out.append(total)
        return out


def _minus(a: RankParams, b: RankParams) -> RankParams:
    return a + b.scaled(-1)


def hide_gpus() -> None:
    """The planner builds nothing on a GPU: hide them before torch initialises CUDA."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
