"""megatron dist checkpoints (the ``torch_dist`` format) read and written one tensor at a time.

A dist checkpoint stores each global tensor under a *key* as chunks (one per saved shard), described by
torch's distributed-checkpoint metadata; loading a region reads only the chunks it overlaps. Our full
(TP = PP = EP = 1) names map onto keys the way megatron's ``sharded_state_dict`` lays them out: a block of
identical LLM layers is one key with a leading layer axis (``decoder.layers.mlp.linear_fc2.weight`` of
shape [L, H, I]), a block with different layers (every MoE model here) has one key per layer, and a
layer's experts share a key with a leading expert axis (``decoder.layers.0.mlp.experts.experts.
linear_fc1.weight`` [E, 2I, H]); a SwiGLU ``linear_fc1`` is stored as one tensor cat(gate, up), whatever
the TP degree. ``DistCheckpointReader`` finds each name in whichever of these forms the checkpoint uses,
so a checkpoint saved under any TP/PP/EP layout reads the same, without megatron, a model or a
process group.

Writing is ``qwen3vl.model.interop.dist_writer``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from qwen3vl.model.interop.mcore_checkpoint import CheckpointArchitectureError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*)mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_FORMAT_FILE = "metadata.json"  # megatron's: which backend wrote the shards


def _candidates(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, leading indices) forms megatron may store our full name under."""
    forms = [(name, ())]
    layer = _LAYER.match(name)
    if layer:
        forms.append((f"decoder.layers.{layer.group(2)}", (int(layer.group(1)),)))
    out = []
    for key, index in forms:
        expert = _EXPERT.match(key)
        if expert:
            head, e, tail = expert.groups()
            out += [(f"{head}mlp.experts.experts.{tail}", index + (int(e),)),
                    (f"{head}mlp.experts.{e}.{tail}", index)]
        else:
            out.append((key, index))
    return out


class DistCheckpointReader:
    """Our full-model tensors read from a dist checkpoint, region by region (thread-safe)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        fmt = self.directory / _FORMAT_FILE
        backend = json.loads(fmt.read_text()).get("sharded_backend") if fmt.is_file() else None
        if backend != "torch_dist":
            raise CheckpointArchitectureError(
                f"{self.directory} is not a megatron dist checkpoint in the torch_dist format ({_FORMAT_FILE} "
                f"{'says ' + repr(backend) if fmt.is_file() else 'is missing'}): give a checkpoint directory "
                "written by qwen3vl (iter_XXXXXXX, or one made by qwen3vl-convert)")
        self._reader = FileSystemReader(str(self.directory))
        metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(metadata, is_coordinator=True)
        self._tensors = {k: md for k, md in metadata.state_dict_metadata.items()
                         if isinstance(md, TensorStorageMetadata)}

    def locate(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The key our full name ``name`` is stored under, and its leading indices there."""
        for key, index in _candidates(name):
            md = self._tensors.get(key)
            if md is not None and len(md.size) > len(index) and all(i < s for i, s in zip(index, md.size)):
                return key, index
        raise KeyError(f"{self.directory} holds no tensor for {name} (looked for "
                       f"{', '.join(k for k, _ in _candidates(name))})")

    def shape(self, name: str) -> tuple[int, ...]:
        key, index = self.locate(name)
        return tuple(self._tensors[key].size[len(index):])

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[self.locate(name)[0]].properties.dtype

    def model_dtype(self) -> torch.dtype:
        """The dtype most model tensors are stored in (optimizer state, fp32 in training checkpoints,
        is not counted)."""
        counts: dict[torch.dtype, int] = {}
        for key, md in self._tensors.items():
            if not key.startswith("optimizer"):
                counts[md.properties.dtype] = counts.get(md.properties.dtype, 0) + 1
        if not counts:
            raise CheckpointArchitectureError(f"{self.directory} holds no model tensors")
        return max(counts, key=counts.get)

    def read(self, names: Sequence[str]) -> list[torch.Tensor]:
        """The full tensors of ``names``, in one pass over the files they live in."""
        targets: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        items = []
        outputs = []
        for name in names:
            key, index = self.locate(name)
            md = self._tensors[key]
            shape = tuple(md.size[len(index):])
            target = torch.empty((1,) * len(index) + shape, dtype=md.properties.dtype)
            offsets = index + (0,) * len(shape)
            targets[(key, offsets)] = target
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.shape)
            items += create_read_items_for_chunk_list(key, md, [chunk])
            outputs.append(target.reshape(shape))
        self._reader.read_data(LoadPlan(items), _RegionPlanner(targets)).wait()
        return outputs


class _RegionPlanner(LoadPlanner):
    """Copies each read chunk into the region of its target tensor (keyed by key and chunk offsets)."""

    def __init__(self, targets: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        self.targets = targets

    def resolve_tensor(self, read_item):
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view: the data is already in place

    def set_up_planner(self, *args, **kwargs):  # the plan is built by the reader, not planned
        raise NotImplementedError

    create_local_plan = create_global_plan = finish_plan = load_bytes = set_up_planner
