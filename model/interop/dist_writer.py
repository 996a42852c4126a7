"""Writing a megatron dist checkpoint (the ``torch_dist`` format) one tensor at a time.

``StreamingSaveStrategy`` plugs into megatron's ``dist_checkpointing.save`` (so common.pt, metadata.json
and the sharding checks are megatron's own) and is given the ``sharded_state_dict`` of a model built on the
meta device: it says which keys, shapes and chunks to write, exactly as training and ``init_from`` will
ask for them. torch's ``FileSystemWriter`` asks the planner for each chunk's data only when it writes that
chunk, so each tensor is produced from the source (``produce(name)``) just in time and dropped after.
The key layout is described in ``qwen3vl.model.interop.dist_reader``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import mcore_to_pyt_state_dict
from torch.distributed.checkpoint import FileSystemWriter, save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType


@dataclass(frozen=True)
class _Region:
    name: str  # our full name
    leading: int  # leading (layer / expert) axes of the key, absent from the full tensor
    offsets: tuple[int, ...]  # within the full tensor
    sizes: tuple[int, ...]


class StreamingSaveStrategy(SaveShardedStrategy):
    """A megatron ``SaveShardedStrategy`` for ``dist_checkpointing.save`` that writes the torch_dist format
    from a ``sharded_state_dict`` whose tensors have no data (meta device): ``produce(name)`` gives our full
    tensor of that name when its first chunk is written. ``threads`` files are written at once."""

    def __init__(self, produce: Callable[[str], torch.Tensor], dtype: torch.dtype, threads: int = 1) -> None:
        super().__init__("torch_dist", 1)  # what megatron's loader expects in metadata.json
        self.produce = produce
        self.dtype = dtype
        self.threads = max(1, threads)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
        regions: dict[str, dict[tuple[int, ...], _Region]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        objects: dict[str, list] = {}
        for part in sharded_state_dict.values():
            for name, value in part.items():
                for leaf in nested_values([value]):
                    if not is_main_replica(leaf.replica_id):
                        continue
                    if isinstance(leaf, ShardedObject):
                        objects[leaf.unique_key] = [leaf]
                    elif isinstance(leaf, ShardedTensor):
                        p = leaf.prepend_axis_num
                        offsets = tuple(leaf.global_offset)
                        regions.setdefault(leaf.key, {})[offsets] = _Region(
                            name, p, offsets[p:], tuple(leaf.local_shape))
                        shapes[leaf.key] = tuple(leaf.global_shape)
        planner = _LazyPlanner(regions, shapes, mcore_to_pyt_state_dict(objects, is_loading=False), self)
        save({}, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=self.threads), planner=planner)

    def region_data(self, region: _Region) -> torch.Tensor:
        full = self.produce(region.name)
        if len(full.shape) != len(region.sizes):
            raise ValueError(f"{region.name}: produced shape {list(full.shape)}, the model's is {list(region.sizes)}")
        part = full
        for dim, (start, size) in enumerate(zip(region.offsets, region.sizes)):
            part = part.narrow(dim, start, size)
        return part.to(self.dtype).reshape((1,) * region.leading + region.sizes).contiguous()


class _LazyPlanner(DefaultSavePlanner):
    """Plans the chunks from the regions (no state dict data) and resolves each chunk's data on demand."""

    def __init__(self, regions, shapes, objects: dict[str, io.BytesIO], strategy: StreamingSaveStrategy) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions, self.shapes, self.objects, self.strategy = regions, shapes, objects, strategy

    def create_local_plan(self) -> SavePlan:
        properties = TensorProperties(dtype=self.strategy.dtype)
        items = [WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(
                               chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                          sizes=torch.Size((1,) * r.leading + r.sizes)),
                               properties=properties, size=torch.Size(self.shapes[key])))
                 for key, chunks in self.regions.items() for offsets, r in chunks.items()]
        items += [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO) for fqn in self.objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return self.objects[write_item.index.fqn]  # already serialised the way megatron reads it
        region = self.regions[write_item.index.fqn][tuple(write_item.index.offset)]
        return self.strategy.region_data(region)
