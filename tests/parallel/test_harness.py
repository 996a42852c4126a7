"""The multi-process harness itself: results, every failing rank's traceback, no hangs."""
import time

import pytest

from qwen3vl_testing.distributed import DistributedTestError, run_distributed


def rank_and_sum(scale):
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    return dist.get_rank() * scale, total.item(), dist.get_world_size()


def every_rank_fails():
    import torch.distributed as dist

    raise ValueError(f"broken on rank {dist.get_rank()}")


def one_rank_fails_while_the_other_waits():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 gives up")
    dist.barrier()  # rank 0 blocks here forever: the harness must not


def sleeps_forever():
    print("going to sleep", flush=True)
    time.sleep(3600)


def returns_unpicklable():
    return lambda: None


def test_runs_on_every_rank_and_reuses_the_pool():
    assert run_distributed(rank_and_sum, world_size=2, scale=10) == [(0, 1.0, 2), (10, 1.0, 2)]
    started = time.monotonic()
    assert run_distributed(rank_and_sum, world_size=2, scale=3) == [(0, 1.0, 2), (3, 1.0, 2)]
    assert time.monotonic() - started < 2.0  # no new processes


def test_reports_every_failing_rank_with_its_traceback():
    with pytest.raises(DistributedTestError) as raised:
        run_distributed(every_rank_fails, world_size=2)
    message = str(raised.value)
    for rank in (0, 1):
        assert f"--- rank {rank}: error ---" in message
        assert f"ValueError: broken on rank {rank}" in message
    assert "in every_rank_fails" in message
    assert run_distributed(rank_and_sum, world_size=2, scale=1)[1] == (1, 1.0, 2)  # pool still usable


def test_unpicklable_results_and_local_functions_are_refused_clearly():
    with pytest.raises(DistributedTestError, match="pickle|Pickl"):
        run_distributed(returns_unpicklable, world_size=2)

    def local():
        return 1

    with pytest.raises(ValueError, match="module-level function"):
        run_distributed(local, world_size=1)


def test_a_rank_stuck_after_another_failed_does_not_hang():
    run_distributed(rank_and_sum, world_size=2, scale=1)  # a warm pool, so only the failure is timed
    started = time.monotonic()
    with pytest.raises(DistributedTestError) as raised:
        run_distributed(one_rank_fails_while_the_other_waits, world_size=2, timeout=300)
    message = str(raised.value)
    assert "RuntimeError: rank 1 gives up" in message
    assert "--- rank 0: timeout ---" in message and "after another rank failed" in message
    assert time.monotonic() - started < 60  # the failure grace period (5 s), far below the timeout
    assert run_distributed(rank_and_sum, world_size=2, scale=2)[1] == (2, 1.0, 2)  # a fresh pool


def test_a_hanging_body_times_out():
    with pytest.raises(DistributedTestError) as raised:
        run_distributed(sleeps_forever, world_size=1, timeout=2)
    message = str(raised.value)
    assert "no answer after 2 s" in message and "going to sleep" in message


def what_the_worker_sees():
    import os

    import torch

    from qwen3vl.parallel import cpu_backend

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available(), cpu_backend.is_enabled()


def test_the_suite_stays_on_the_cpu_where_a_gpu_is_visible():
    """F5: the pytest process (tests/conftest.py) and every CPU worker hide CUDA, so megatron allocates on
    the CPU with the CPU backend on, also on a machine with a GPU."""
    import os

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert run_distributed(what_the_worker_sees, world_size=2) == [("", False, True)] * 2
    with pytest.raises(ValueError, match="device 'tpu'"):
        run_distributed(what_the_worker_sees, world_size=1, device="tpu")


def builds_groups_and_counts_network_threads():
    """Builds a TP2 layout's groups, as a test body does, and counts this process's gloo network-loop threads
    (read from /proc after a collective on a new group, so they exist)."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(tp=2), device="cpu")
    from megatron.core import parallel_state

    dist.all_reduce(torch.ones(1), group=parallel_state.get_tensor_model_parallel_group())
    return sum((task / "comm").read_text().strip() == "gloo_tcp_loop" for task in Path("/proc/self/task").iterdir())


def test_the_groups_a_body_builds_are_gone_after_it():
    """megatron forgets its groups but torch keeps them, each gloo group with live network threads: a pool
    that ran the suite's bodies spent a third of a core idling. The harness destroys them after each body."""
    counts = [run_distributed(builds_groups_and_counts_network_threads, world_size=2)[0] for _ in range(3)]
    assert counts[0] > 0 and counts[2] == counts[0], counts
