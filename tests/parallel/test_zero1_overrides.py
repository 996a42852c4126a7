"""wrap_for_training builds its one ZeRO-1 optimizer with the caller's per-parameter-group overrides."""
from qwen3vl_testing.distributed import run_distributed

BASE_LR, EMBEDDING_LR, WEIGHT_DECAY = 1e-3, 5e-3, 0.1


def groups_of_every_parameter() -> dict[str, tuple[float, float, float]]:
    """Per rank: name -> (max_lr, min_lr, weight decay, ndim) of the group holding its shard on this rank."""
    from megatron.core.optimizer import OptimizerConfig, ParamKey
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl_testing.tiny_gpt import TinyGPT, build_chunks
    from qwen3vl.parallel.zero1 import wrap_for_training

    layout = ParallelLayout()  # dp = world size: the optimizer state is sharded over both ranks
    initialize_parallel(layout)
    overrides = {
        ParamKey(name="*embedding*"): {"max_lr": EMBEDDING_LR, "min_lr": EMBEDDING_LR / 10},
        ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="no_decay", fn=lambda p, n: p.dim() == 1 or n.endswith(".bias"))): {"wd_mult": 0.0},
    }
    config = OptimizerConfig(optimizer="adam", lr=BASE_LR, min_lr=BASE_LR / 10, weight_decay=WEIGHT_DECAY,
                             bf16=False, use_distributed_optimizer=True)
    chunks, optimizer = wrap_for_training(build_chunks(TinyGPT(), layout), layout, config,
                                          config_overrides=overrides)
    group_of = {}  # megatron may chain one DistributedOptimizer per parameter kind (dense / expert)
    for distributed in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param, (group_index, _) in distributed.model_param_group_index_map.items():
            group_of[id(param)] = distributed.optimizer.param_groups[group_index]
    held = {name: (group_of[id(param)]["max_lr"], group_of[id(param)]["min_lr"],
                   group_of[id(param)]["wd_mult"] * WEIGHT_DECAY, param.dim())
            for chunk in chunks for name, param in chunk.named_parameters() if id(param) in group_of}
    return held, [name for chunk in chunks for name, _ in chunk.named_parameters()]


def test_overrides_set_the_lr_and_weight_decay_of_the_matching_parameter_groups():
    per_rank = run_distributed(groups_of_every_parameter, world_size=2)
    (held_0, names), (held_1, _) = per_rank
    found = {**held_0, **held_1}
    assert set(found) == set(names), "every parameter is held by the optimizer of some rank"
    assert any("embedding" in name for name in found) and any(dim == 1 for *_, dim in found.values())
    for name, (max_lr, min_lr, weight_decay, dim) in found.items():
        lr = EMBEDDING_LR if "embedding" in name else BASE_LR
        decay = 0.0 if dim == 1 or name.endswith(".bias") else WEIGHT_DECAY
        assert (max_lr, min_lr, weight_decay) == (lr, lr / 10, decay), name
