"""initialize_parallel builds megatron's process groups with the expected members (real gloo ranks)."""
from qwen3vl_testing.distributed import run_distributed


def group_members(layouts):
    """For each layout: this rank's TP/PP/CP/EP/DP/expert-DP group members, as rank lists."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    found = []
    for kwargs in layouts:
        initialize_parallel(ParallelLayout(**kwargs))
        found.append({
            "tp": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
            "pp": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
            "cp": dist.get_process_group_ranks(ps.get_context_parallel_group()),
            "ep": dist.get_process_group_ranks(ps.get_expert_model_parallel_group()),
            "dp": dist.get_process_group_ranks(ps.get_data_parallel_group()),
            "dp_cp": dist.get_process_group_ranks(ps.get_data_parallel_group(with_context_parallel=True)),
            "expert_dp": dist.get_process_group_ranks(ps.get_expert_data_parallel_group()),
        })
        destroy_parallel()
    return found


def expected(rank, **groups_by_rank):
    """Pick, for ``rank``, the group that contains it from each list of groups."""
    return {name: next(g for g in groups if rank in g) for name, groups in groups_by_rank.items()}


def test_two_rank_layouts():
    layouts = [dict(tp=2), dict(pp=2), dict(cp=2), dict(ep=2)]
    per_rank = run_distributed(group_members, world_size=2, layouts=layouts)
    pair, single = [[0, 1]], [[0], [1]]
    for rank, (tp2, pp2, cp2, ep2) in enumerate(per_rank):
        assert tp2 == expected(rank, tp=pair, pp=single, cp=single, ep=single, dp=single, dp_cp=single,
                               expert_dp=single)
        assert pp2 == expected(rank, tp=single, pp=pair, cp=single, ep=single, dp=single, dp_cp=single,
                               expert_dp=single)
        assert cp2 == expected(rank, tp=single, pp=single, cp=pair, ep=single, dp=single, dp_cp=pair,
                               expert_dp=pair)
        # Experts split over both ranks; the dense weights are replicated over both (dp = 2).
        assert ep2 == expected(rank, tp=single, pp=single, cp=single, ep=pair, dp=pair, dp_cp=pair,
                               expert_dp=single)


def test_four_rank_layouts():
    per_rank = run_distributed(group_members, world_size=4, layouts=[dict(tp=2, pp=2), dict(tp=2)])
    singles = [[0], [1], [2], [3]]
    for rank, (tp2_pp2, dp2_tp2) in enumerate(per_rank):
        # Megatron's rank order tp-cp-ep-dp-pp: TP neighbours are adjacent, pipeline stages outermost.
        assert tp2_pp2 == expected(rank, tp=[[0, 1], [2, 3]], pp=[[0, 2], [1, 3]], cp=singles, ep=singles,
                                   dp=singles, dp_cp=singles, expert_dp=singles)
        assert dp2_tp2 == expected(rank, tp=[[0, 1], [2, 3]], pp=singles, cp=singles, ep=singles,
                                   dp=[[0, 2], [1, 3]], dp_cp=[[0, 2], [1, 3]], expert_dp=[[0, 2], [1, 3]])


# --- which device a process computes on (train.device) ------------------------------------------------------

def _no_gpu(monkeypatch, machine_has_gpus: bool, visible=None):
    import torch

    from qwen3vl.parallel import groups

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(groups, "machine_has_nvidia_gpus", lambda: machine_has_gpus)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return groups.resolve_device


def test_a_machine_without_gpus_trains_on_the_cpu(monkeypatch):
    import pytest

    resolve = _no_gpu(monkeypatch, machine_has_gpus=False)
    assert resolve("auto").type == "cpu" and resolve("cpu").type == "cpu"
    with pytest.raises(RuntimeError, match="train.device=cuda but torch cannot use a GPU.*train.device=cpu"):
        resolve("cuda")
    with pytest.raises(ValueError, match="choose one of auto, cuda, cpu"):
        resolve("gpu")


def test_gpus_that_torch_cannot_use_are_an_error_not_a_cpu_run(monkeypatch):
    import pytest

    resolve = _no_gpu(monkeypatch, machine_has_gpus=True)
    with pytest.raises(RuntimeError, match="this machine has NVIDIA GPUs but torch cannot use them"):
        resolve("auto")
    assert resolve("cpu").type == "cpu"  # asked for on purpose
    resolve = _no_gpu(monkeypatch, machine_has_gpus=True, visible="")
    assert resolve("auto").type == "cpu"  # hidden on purpose
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES is empty|CPU-only build"):
        resolve("cuda")


def test_the_launcher_pins_one_device_for_every_rank():
    from qwen3vl.launch.launcher import rank_device
    from qwen3vl.train.config import Qwen3VLTrainConfig

    cfg = Qwen3VLTrainConfig()
    assert rank_device(cfg, slurm_gpus_per_node=8) == "cuda"  # a Slurm job asked for GPUs: checked on the nodes
    assert rank_device(cfg, slurm_gpus_per_node=0) == "cpu"  # a Slurm CPU job
    assert rank_device(cfg, slurm_gpus_per_node=None) in ("cpu", "cuda")  # torchrun: this machine's answer
