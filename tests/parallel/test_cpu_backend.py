"""The CPU backend: off with a GPU, confined to megatron's modules, and the RNG/recompute paths on CPU."""
import subprocess
import sys
import textwrap

from qwen3vl_testing.distributed import run_distributed

# Runs in a fresh interpreter: the pytest process may already have the backend enabled.
_FRESH_PROCESS_CHECK = textwrap.dedent("""
    import sys
    import torch
    from qwen3vl.parallel import cpu_backend

    real_is_available = torch.cuda.is_available
    meta_path, tensor_cuda, tensor_type = list(sys.meta_path), torch.Tensor.cuda, torch.Tensor.type
    torch.cuda.is_available = lambda: True            # pretend this is a GPU process
    assert cpu_backend.enable() is False and not cpu_backend.is_enabled()
    assert sys.meta_path == meta_path and torch.Tensor.cuda is tensor_cuda and torch.Tensor.type is tensor_type
    import megatron.core.optimizer.optimizer as megatron_optimizer
    assert megatron_optimizer.torch is torch, "a GPU process must see the real torch in megatron"

    torch.cuda.is_available = real_is_available      # now the CPU process it really is
    assert cpu_backend.enable() is True and cpu_backend.enable() is True and cpu_backend.is_enabled()
    assert sys.meta_path.count(sys.meta_path[0]) == 1 and len(sys.meta_path) == len(meta_path) + 1
    seen = megatron_optimizer.torch
    assert seen is not torch and seen.cuda.current_device() == torch.device("cpu")
    assert seen.zeros(2, device="cuda").device.type == "cpu"
    seen.cuda.synchronize(); seen.cuda.Stream().wait_stream(seen.cuda.current_stream())
    assert seen.cuda.max_memory_allocated() == 0
    assert "megatron.core.dist_checkpointing.exchange_utils" not in sys.modules
    import megatron.core.dist_checkpointing.exchange_utils as late   # imported after enable(): the hook
    assert late.torch is seen

    # Outside megatron nothing changed: CUDA calls still fail as on any CPU-only build.
    for call in (torch.cuda.current_device, lambda: torch.zeros(1).cuda(), lambda: torch.zeros(1, device="cuda")):
        try:
            call()
        except (AssertionError, RuntimeError):
            pass
        else:
            raise SystemExit("user-level CUDA call unexpectedly succeeded")
    assert torch.zeros(1).type() == "torch.FloatTensor"
    print("OK")
""")


def test_off_with_cuda_and_confined_to_megatron_without():
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CHECK], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def rng_and_recompute():
    """Megatron's model-parallel RNG tracker and activation recomputation, on CPU tensors."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(tp=2), seed=42)
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    default_draw = torch.rand(4)

    x = torch.randn(8, 8, requires_grad=True)
    rng_before = (torch.get_rng_state(), tracker.get_states())
    direct = _dropout_block(x)
    direct.sum().backward()
    direct_grad = x.grad.clone()
    x.grad = None
    torch.set_rng_state(rng_before[0])
    tracker.set_states(rng_before[1])
    recomputed = tensor_parallel.checkpoint(_dropout_block, False, x)
    recomputed.sum().backward()
    return {"tp_draw": tp_draw, "default_draw": default_draw, "same_forward": torch.equal(direct, recomputed),
            "same_grad": torch.equal(direct_grad, x.grad), "dropped": int((direct == 0).sum())}


def _dropout_block(x):
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():  # dropout inside the TP region draws from the tracker's stream
        return torch.nn.functional.dropout(torch.tanh(x) * 2, p=0.5, training=True)


def test_rng_tracker_and_activation_recompute_on_cpu():
    rank0, rank1 = run_distributed(rng_and_recompute, world_size=2)
    for result in (rank0, rank1):
        assert result["same_forward"] and result["same_grad"], "recompute must replay the same dropout mask"
        assert 8 < result["dropped"] < 56
    # TP ranks get different model-parallel streams, but the same default (data-parallel) stream.
    assert not rank0["tp_draw"].equal(rank1["tp_draw"])
    assert rank0["default_draw"].equal(rank1["default_draw"])
