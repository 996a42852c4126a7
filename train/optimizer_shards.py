"""The distributed optimizer's state in a checkpoint, written and read by every rank in place: no gather.

ZeRO-1 gives each data-parallel rank a contiguous flat range of every parameter it holds (its
TP/PP/EP-local tensor): the fp32 main weights and the Adam moments of that range. megatron-core 0.16.1
offers three ways to put them in a dist checkpoint, none of which fits a large run:

* ``fully_reshardable`` (reshardable under any layout) gathers each DP group's whole optimizer state
  (12 bytes per parameter of the TP/PP shard) into host RAM: on every rank by default, on DP rank 0 in
  its memory-efficient mode. About 53 GB per rank for the 8B at TP2.
* ``dp_reshardable`` writes each rank's buckets as they are, but they only load under the same TP/PP/EP.
* ``fully_sharded_model_space`` would write each rank's range, but needs ``flattened_range``, which
  0.16.1's ShardedTensor rejects.

So this module writes the *storage* of ``fully_reshardable``, one tensor of the parameter's global shape
per state (``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``), from the ranges each rank
already holds: a flat range of a row-major tensor is a union of a few boxes (at most 2·ndim − 1), and
each box is a plain ShardedTensor over the global tensor (uneven sharding, which dist checkpointing
hands to torch DCP), under the same key whatever the layout. Nothing is gathered or copied; the boxes are views of the optimizer's tensors, and
torch_dist stages only what this rank writes (its 1/dp of the optimizer state).

Loading asks for the boxes of this rank's range under the *current* layout, again as views of the
optimizer's own tensors, so DCP reads exactly the overlap of what was written and what is needed: a
checkpoint loads under any TP/PP/EP/DP, and loading allocates nothing either. Because the storage is
``fully_reshardable``'s, checkpoints written by megatron's own ``fully_reshardable`` save load here, and
megatron's ``fully_reshardable`` loader reads these (with ``chained_optim_avoid_prefix`` for a chained
optimizer: megatron would prefix each part's keys, see ``sharded_state_dict``).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

# What the checkpoint records as the optimizer's sharding type: the storage format is megatron's.
SHARDING_TYPE = "fully_reshardable"
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
_PREFIX = "optimizer.state"

Box = tuple[tuple[int, ...], tuple[int, ...], int, int]  # (offset, shape, flat start, flat stop)


class OptimizerCheckpointError(RuntimeError):
    pass


# ---- geometry ---------------------------------------------------------------------------------------

def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """The boxes whose union is the flat (row-major) element range [start, stop) of a tensor of ``shape``.

    Each box is (offset, box shape, flat start, flat stop), in the order of the flat range; the boxes'
    flat ranges are consecutive. An empty range gives no box.
    """
    shape = tuple(int(s) for s in shape)
    if start >= stop:
        return []
    if not shape:
        return [((), (), 0, 1)]
    if len(shape) == 1:
        return [((start,), (stop - start,), start, stop)]
    inner = math.prod(shape[1:])
    first_row, last_row = start // inner, (stop - 1) // inner

    def in_row(row: int, a: int, b: int) -> list[Box]:
        base = row * inner
        return [((row, *offset), (1, *box), base + fa, base + fb)
                for offset, box, fa, fb in flat_range_boxes(shape[1:], a - base, b - base)]

    if first_row == last_row:
        return in_row(first_row, start, stop)
    boxes: list[Box] = []
    full_from, full_to = first_row, last_row + 1  # rows covered completely: [full_from, full_to)
    if start % inner:
        boxes += in_row(first_row, start, (first_row + 1) * inner)
        full_from += 1
    tail = stop % inner
    if tail:
        full_to -= 1
    if full_to > full_from:
        boxes.append(((full_from,) + (0,) * (len(shape) - 1), (full_to - full_from, *shape[1:]),
                      full_from * inner, full_to * inner))
    if tail:
        boxes += in_row(last_row, last_row * inner, stop)
    return boxes


def _pieces(metadata: ShardedTensor | ShardedTensorFactory, param: torch.Tensor) -> list[tuple[ShardedTensor, int]]:
    """The plain ShardedTensors a parameter is saved as, each with its flat offset inside the parameter.

    A factory (megatron's SwiGLU fc1 splits its weight into two halves, each its own part of a global
    tensor) is built on a meta tensor of the parameter's shape, which tells where each part lies.
    """
    if isinstance(metadata, ShardedTensor):
        if metadata.flattened_range is not None:
            raise OptimizerCheckpointError(f"{metadata.key}: flattened model tensors are not supported")
        return [(metadata, 0)]
    probe = torch.empty(param.shape, dtype=param.dtype, device="meta")
    built = metadata.build_fn(metadata.key, probe, metadata.replica_id, None)
    pieces = []
    for part in nested_values(built):
        if not isinstance(part, ShardedTensor) or not part.data.is_contiguous():
            raise OptimizerCheckpointError(f"{metadata.key}: its sharded-state factory yields a part that is not "
                                           "a contiguous slice of the parameter; this optimizer format cannot "
                                           "save it")
        pieces.append((part, part.data.storage_offset() - probe.storage_offset()))
    return pieces


def _main_replica_over_dp(replica_id: Any, key: str) -> tuple:
    # The model tensor's replica id is (pipeline, tensor, data-parallel); every DP rank owns its own
    # range of the optimizer state, so along DP none of them is a replica of another.
    if not (isinstance(replica_id, tuple) and len(replica_id) == 3):
        raise OptimizerCheckpointError(f"{key}: expected a (PP, TP, DP) replica id, got {replica_id!r}")
    return (replica_id[0], replica_id[1], 0)


def _boxes_of_range(metadata, param: torch.Tensor, start: int, stop: int, flat_state: dict[str, torch.Tensor],
                    prefix: str = "") -> Iterator[tuple[str, ShardedTensor]]:
    """ShardedTensors covering the flat range [start, stop) of ``param``, for each optimizer state."""
    for part, part_offset in _pieces(metadata, param):
        numel = part.data.numel()
        a, b = max(start, part_offset), min(stop, part_offset + numel)
        if a >= b:
            continue
        lead = part.prepend_axis_num  # stacked-layer / expert axes in front of the local shape
        for offset, shape, fa, fb in flat_range_boxes(part.local_shape, a - part_offset, b - part_offset):
            global_offset = (*part.global_offset[:lead],
                             *(g + o for g, o in zip(part.global_offset[lead:], offset)))
            lo, hi = part_offset + fa - start, part_offset + fb - start
            for state_key, flat in flat_state.items():
                yield state_key, ShardedTensor(
                    key=f"{prefix}{_PREFIX}.{state_key}.{part.key}", data=flat[lo:hi].view((1,) * lead + shape),
                    dtype=flat.dtype, local_shape=(1,) * lead + shape, global_shape=part.global_shape,
                    global_offset=global_offset, axis_fragmentations=None,
                    replica_id=_main_replica_over_dp(part.replica_id, part.key))


# ---- the sharded state dict -------------------------------------------------------------------------

def _distributed(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _param_state(opt: DistributedOptimizer, model_sharded_state_dict: dict, prefix: str) -> dict[int, dict[str, list]]:
    """{parameter index: {state key: [boxes]}} for every parameter this rank holds a range of."""
    if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        # Its states are scaled copies, not tensors a load could fill in place.
        raise OptimizerCheckpointError("optimizer checkpoints do not support use_precision_aware_optimizer: "
                                       "turn it off")
    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    by_param = {id(sh.data): sh for sh in nested_values(tensors)}
    state: dict[int, dict[str, list]] = {}
    for gbuf_range_maps in opt.gbuf_ranges:
        for gbuf_range_map_for_all_buckets in gbuf_range_maps.values():
            for gbuf_range_map in gbuf_range_map_for_all_buckets:
                for model_param, range_map in gbuf_range_map["param_map"].items():
                    metadata = by_param.get(id(model_param))
                    if metadata is None:
                        raise OptimizerCheckpointError(
                            f"a parameter of shape {tuple(model_param.shape)} is not in the model's sharded "
                            "state dict (build it with keep_vars=True)")
                    tensors = opt._get_main_param_and_optimizer_states(model_param)
                    flat = {k: tensors[k].detach().view(-1) for k in STATE_KEYS}
                    entry: dict[str, list] = {k: [] for k in STATE_KEYS}
                    r = range_map["param"]
                    for state_key, box in _boxes_of_range(metadata, model_param, r.start, r.end, flat, prefix):
                        entry[state_key].append(box)
                    state[len(state)] = entry
    return state


def sharded_state_dict(optimizer, model_sharded_state_dict: dict, key_prefixes: Sequence[str] | None = None) -> dict:
    """The optimizer's part of a checkpoint, for saving and for loading (the boxes are views of the
    optimizer's tensors, so a load fills them in place). Non-distributed optimizers keep megatron's own.

    Keys carry no per-optimizer prefix: megatron splits the optimizer differently under different
    layouts (dense and expert parameters share one optimizer when their DP groups coincide), and the
    model keys are unique anyway. ``key_prefixes`` reads checkpoints that had them (see ``key_prefixes``).
    """
    optimizers = _distributed(optimizer)
    if len(optimizers) > 1:
        optimizer._synchronize_steps()
    out = {}
    for index, opt in enumerate(optimizers):
        if not isinstance(opt, DistributedOptimizer):
            out[index] = opt.sharded_state_dict(model_sharded_state_dict)
            continue
        sd = opt.state_dict()  # param groups (lrs, steps) and the grad scaler: the common part
        sd["param_state"] = _param_state(opt, model_sharded_state_dict, key_prefixes[index] if key_prefixes else "")
        sd["param_state_sharding_type"] = SHARDING_TYPE
        out[index] = sd
    return out[0] if len(optimizers) == 1 else out


def key_prefixes(checkpoint_dir: str, optimizer) -> list[str] | None:
    """The 'chained_<i>.' key prefixes of a checkpoint written by megatron's own fully_reshardable save of
    a chained optimizer (MoE), or None when its keys have none; such a checkpoint loads only into an
    optimizer split into as many parts."""
    keys = dist_checkpointing.load_tensors_metadata(checkpoint_dir).keys()
    found = sorted({k.split(".", 1)[0] for k in keys if k.startswith("chained_") and f".{_PREFIX}." in f".{k}"})
    if not found:
        return None
    if len(found) != len(_distributed(optimizer)):
        raise OptimizerCheckpointError(
            f"{checkpoint_dir} stores the optimizer of {len(found)} chained parts ({', '.join(found)}) but this "
            f"layout's optimizer has {len(_distributed(optimizer))}: resume under the layout it was saved with")
    return [f"{p}." for p in found]


def load_common(optimizer, common: dict) -> None:
    """Restores the non-tensor optimizer state (param groups, steps, grad scaler) from the checkpoint's
    common part, allocating the Adam moments if they are missing. Call it before building the loading
    state dict, whose boxes are views of those tensors.

    megatron matches param groups by what they are (weight decay and lr multipliers, expert or not),
    so the groups of every part the checkpoint's optimizer had are offered to every part of this one.
    """
    parts = [common] if "optimizer" in common else [common[k] for k in sorted(common)]
    for part in parts:
        kind = part.get("param_state_sharding_type", SHARDING_TYPE)
        if kind != SHARDING_TYPE:
            raise OptimizerCheckpointError(
                f"the checkpoint's optimizer state is in megatron's '{kind}' format, which loads only under "
                "the layout it was saved with: resume under that layout")
    groups = [g for part in parts for g in part["optimizer"]["param_groups"]]
    for opt in _distributed(optimizer):
        if isinstance(opt, DistributedOptimizer):
            first = {k: v for k, v in parts[0].items() if k not in ("param_state", "param_state_sharding_type")}
            opt.load_state_dict({**first, "optimizer": {**first["optimizer"], "param_groups": groups}})


def box_targets(optimizer, optimizer_sharded_state_dict: dict) -> dict[tuple, torch.Tensor]:
    """The tensors the loading state dict's boxes fill, by (optimizer, parameter, state, piece)."""
    targets = {}
    for i, part in enumerate(_per_optimizer(optimizer, optimizer_sharded_state_dict)):
        for index, entry in part.get("param_state", {}).items():
            for state_key, boxes in entry.items():
                for j, box in enumerate(boxes):
                    targets[(i, index, state_key, j)] = box.data
    return targets


def apply_loaded(optimizer, targets: dict[tuple, torch.Tensor], loaded: dict) -> None:
    """Copies the loaded boxes into the optimizer's tensors (nothing to do where the load filled the views
    in place); non-distributed optimizers load their own state."""
    parts = _per_optimizer(optimizer, loaded)
    for opt, part in zip(_distributed(optimizer), parts):
        if not isinstance(opt, DistributedOptimizer):
            opt.load_state_dict(part)
    for (i, index, state_key, j), target in targets.items():
        value = parts[i]["param_state"][index][state_key][j]
        if value.data_ptr() != target.data_ptr():
            target.copy_(value)


def _per_optimizer(optimizer, tree: dict) -> list:
    n = len(_distributed(optimizer))
    return [tree] if n == 1 else [tree[i] for i in range(n)]
