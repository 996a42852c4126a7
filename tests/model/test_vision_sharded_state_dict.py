"""The ViT's sharded state dict under TP2: its blocks' and DeepStack mergers' tensor-parallel weights are
saved as TP shards of the full tensor, everything else of the vision tower as one tensor replicated over TP.

The blocks and mergers live in plain ModuleLists, which megatron's default ``sharded_state_dict`` would
record with their local shape as replicated tensors, so a TP2 checkpoint would not load under TP1.
"""
from __future__ import annotations

from qwen3vl_testing.distributed import run_distributed


def vision_shards_at_tp2() -> dict:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.presets import get_preset
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(tp=2))
    [model] = build_model_chunks(get_preset("tiny"))
    sharded = model.sharded_state_dict()  # what qwen3vl-convert and the training checkpoints save
    params = {f"vision.{name}": p for name, p in model.vision.named_parameters()}
    saved = {}
    for key, entry in sharded.items():
        if key.startswith("vision.") and isinstance(entry, ShardedTensor):  # not the linears' _extra_state
            param = params.get(key)
            saved[key] = {
                "local": tuple(entry.local_shape), "global": tuple(entry.global_shape),
                "offset": tuple(entry.global_offset), "replica_id": entry.replica_id,
                "param_shape": None if param is None else tuple(param.shape),
                "partition_dim": param.partition_dim if getattr(param, "tensor_model_parallel", False) else None,
            }
    return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "params": sorted(params), "saved": saved}


def test_vit_tensor_parallel_weights_are_saved_as_tp_shards():
    for result in run_distributed(vision_shards_at_tp2, world_size=2, timeout=300):
        rank, saved = result["tp_rank"], result["saved"]
        assert sorted(saved) == result["params"]  # every ViT parameter, under its usual name
        split = {key: entry["partition_dim"] for key, entry in saved.items() if entry["partition_dim"] is not None}
        assert any(".layers." in key for key in split) and any(".deepstack_merger_list." in key for key in split)
        for key, entry in saved.items():
            assert entry["local"] == entry["param_shape"], key
            dim = entry["partition_dim"]
            if dim is None:  # replicated over TP: the full tensor, written by TP rank 0 only
                assert entry["global"] == entry["local"], key
                assert entry["offset"] == (0,) * len(entry["local"]), key
                assert entry["replica_id"][1] == rank, key
            else:  # this rank's half of the full tensor along the partition dim, written by this rank
                expected_global = tuple(n * 2 if d == dim else n for d, n in enumerate(entry["local"]))
                expected_offset = tuple(rank * n if d == dim else 0 for d, n in enumerate(entry["local"]))
                assert entry["global"] == expected_global, key
                assert entry["offset"] == expected_offset, key
                assert entry["replica_id"][1] == 0, key
