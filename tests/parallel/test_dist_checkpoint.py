"""A megatron dist checkpoint written under TP2 (and under PP2) loads under TP1 with equal weights."""
from qwen3vl_testing.distributed import run_distributed


def save_sharded_then_load_unsharded(directory, saving_layouts):
    import torch

    from qwen3vl_testing import tiny_gpt
    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    single = ParallelLayout()
    original_model, other_model = tiny_gpt.TinyGPT(seed=1), tiny_gpt.TinyGPT(seed=2)
    initialize_parallel(single, seed=original_model.seed)
    original = tiny_gpt.build_chunks(original_model, single)
    expected = {k: v.clone() for k, v in original[0].state_dict().items() if isinstance(v, torch.Tensor)}
    tiny_gpt.save_weights(original, f"{directory}/single")
    destroy_parallel()

    results = {}
    for name, kwargs in saving_layouts.items():
        layout = ParallelLayout(**kwargs)
        initialize_parallel(layout, seed=other_model.seed)
        sharded = tiny_gpt.build_chunks(other_model, layout)  # different weights until loaded
        tiny_gpt.load_weights(sharded, f"{directory}/single")
        local_shapes = {k: tuple(v.shape) for k, v in sharded[0].state_dict().items() if k in expected}
        tiny_gpt.save_weights(sharded, f"{directory}/{name}")  # the checkpoint under test
        destroy_parallel()

        initialize_parallel(single, seed=other_model.seed)
        restored = tiny_gpt.build_chunks(other_model, single)
        before = restored[0].state_dict()
        differed = sum(not torch.equal(before[k], expected[k]) for k in expected)
        tiny_gpt.load_weights(restored, f"{directory}/{name}")
        after = restored[0].state_dict()
        results[name] = {
            "differed_before_load": differed,
            "unequal_after_load": sorted(k for k in expected if not torch.equal(after[k], expected[k])),
            "sharded_qkv_shape": local_shapes.get("decoder.layers.0.self_attention.linear_qkv.weight"),
            "full_qkv_shape": tuple(expected["decoder.layers.0.self_attention.linear_qkv.weight"].shape),
            "local_layers": sum(k.endswith("linear_qkv.weight") for k in local_shapes),
        }
        destroy_parallel()
    return results


def test_tp2_and_pp2_checkpoints_load_at_tp1(tmp_path):
    per_rank = run_distributed(save_sharded_then_load_unsharded, world_size=2, timeout=300,
                               directory=str(tmp_path), saving_layouts={"tp2": dict(tp=2), "pp2": dict(pp=2)})
    for results in per_rank:
        tp2, pp2 = results["tp2"], results["pp2"]
        for result in (tp2, pp2):
            assert result["differed_before_load"] > 10  # the loaded weights really come from the checkpoint
            assert result["unequal_after_load"] == []
        full_rows, columns = tp2["full_qkv_shape"]
        assert tp2["sharded_qkv_shape"] == (full_rows // 2, columns)  # it really was saved TP-sharded
        assert tp2["local_layers"] == 4 and pp2["local_layers"] == 2  # ... and PP-split
