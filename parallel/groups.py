"""Process groups: torch.distributed plus megatron-core's parallel_state for one ``ParallelLayout``.

``initialize_parallel`` is the one place a process joins the job: it resolves the device the process
computes on (``resolve_device``: this rank's GPU, or the CPU), starts torch.distributed from the torchrun
environment when needed (NCCL on a GPU, gloo on the CPU), switches megatron to the CPU backend for a CPU
run, builds the TP/PP/CP/EP/DP groups and seeds the model-parallel RNG. ``process_device()`` tells the
rest of the process (the model build, the micro-batches) where that is.
"""
from __future__ import annotations

import glob
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

from qwen3vl.parallel import cpu_backend
from qwen3vl.parallel.layout import LayoutError, ParallelLayout

DEVICES = ("auto", "cuda", "cpu")
_process_device: Optional[torch.device] = None


def machine_has_nvidia_gpus() -> bool:
    """Whether the NVIDIA driver lists a GPU on this machine, whatever torch can see."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or bool(glob.glob("/dev/nvidia[0-9]*"))


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty: request GPUs for the job (e.g. Slurm --gpus-per-node)"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: check the driver "
            "(nvidia-smi) against that CUDA version")


def resolve_device(requested: str = "auto") -> torch.device:
    """The device this process computes on: ``cuda`` (the GPU of its LOCAL_RANK) or ``cpu``.

    ``auto`` is cuda when torch sees a GPU, and cpu on a machine without NVIDIA GPUs or where
    ``CUDA_VISIBLE_DEVICES`` is set empty (hidden on purpose); on a machine whose GPUs torch cannot use it
    is an error, as is ``cuda`` without a usable GPU: a GPU job never quietly becomes a gloo/fp32 CPU job.
    ``cpu`` trains on the CPU even where GPUs exist (hide them from the process first,
    ``CUDA_VISIBLE_DEVICES=``, so that megatron runs on its CPU backend). A process that already joined a
    gloo job (the test harness) resolves ``auto`` to cpu.
    """
    if requested not in DEVICES:
        raise ValueError(f"device {requested!r}: choose one of {', '.join(DEVICES)}")
    joined_gloo = dist.is_initialized() and dist.get_backend() == "gloo"
    if requested == "cpu" or (requested == "auto" and joined_gloo):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if requested == "cuda":
        raise RuntimeError(f"train.device=cuda but torch cannot use a GPU: {_no_cuda_reason()}; or set "
                           "train.device=cpu to train on the CPU")
    if machine_has_nvidia_gpus() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        raise RuntimeError(f"this machine has NVIDIA GPUs but torch cannot use them: {_no_cuda_reason()}; or "
                           "set train.device=cpu to train on the CPU on purpose")
    return torch.device("cpu")


def process_device() -> torch.device:
    """Where this process computes (set by ``initialize_parallel``; before it, what ``auto`` resolves to)."""
    return _process_device if _process_device is not None else resolve_device("auto")


def initialize_parallel(layout: ParallelLayout, seed: int = 1234, timeout_s: float = 1800.0,
                        device: Union[str, torch.device] = "auto") -> torch.device:
    """Join the job and build megatron's process groups for ``layout``; returns the process's device.

    Args:
        layout: the degrees; the world size must be a multiple of tp·pp·cp (and etp·ep·pp).
        seed: base seed; megatron derives the per-TP-rank / per-EP-rank / data-parallel seeds from it.
        timeout_s: collective timeout, also used when this call starts torch.distributed.
        device: ``auto``, ``cuda``, ``cpu`` (see ``resolve_device``) or a torch.device.
    """
    global _process_device
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    on_gpu = device.type == "cuda"
    if on_gpu:  # one process per GPU, as torchrun sets LOCAL_RANK
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s),
                                **_single_process_rendezvous())
    # A CPU run where torch sees GPUs (a conversion on a GPU host) keeps megatron as it is: its tensors
    # are created on the CPU (use_cpu_initialization), and it runs no forward pass.
    if not on_gpu:
        cpu_backend.enable()
    _process_device = device
    world_size = dist.get_world_size()
    if world_size % layout.model_parallel_size:
        raise LayoutError([f"world size {world_size} is not divisible by tp·pp·cp = "
                           f"{layout.model_parallel_size}: use a multiple of it or reduce tp, pp or cp"])

    from megatron.core import parallel_state  # lazy: keeps the launcher free of megatron
    from megatron.core.tensor_parallel.random import (  # lazy: keeps the launcher free of megatron
        model_parallel_cuda_manual_seed)

    define_router_gemm_fallback()
    define_norm_recompute_fallback()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        # Without a GPU every group is already a gloo group: the extra gloo copies would only cost time.
        create_gloo_process_groups=on_gpu,
    )
    model_parallel_cuda_manual_seed(seed)
    return device


def define_router_gemm_fallback() -> None:
    """megatron-core 0.16.1's MoE router (``moe_utils.RouterGatingLinearFunction``) reads the module global
    ``te_general_gemm``, which ``moe_utils`` defines only when transformer-engine imports: without TE every
    MoE forward raised NameError, on GPU as on CPU. None selects its torch path. Every run joins through
    ``initialize_parallel``, so it is applied there, before any model exists."""
    from megatron.core.transformer.moe import moe_utils  # lazy: keeps the launcher free of megatron

    vars(moe_utils).setdefault("te_general_gemm", None)


def define_norm_recompute_fallback() -> None:
    """megatron-core 0.16.1's ``CheckpointWithoutOutput`` (selective recompute of the norms,
    ``recompute_modules`` "layernorm") sets ``self.fp8 = fp8 is not None``, so it always takes its FP8
    branch, which calls transformer-engine: without TE every such forward raised NameError, on GPU as on
    CPU. Without TE there is no FP8, so the flag is cleared after megatron's own ``__init__``."""
    from megatron.core.tensor_parallel import random  # lazy: keeps the launcher free of megatron

    checkpoint = random.CheckpointWithoutOutput
    if random.HAVE_TE or getattr(checkpoint, "_fp8_needs_te", False):
        return
    init = checkpoint.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.fp8 = False

    checkpoint.__init__ = __init__
    checkpoint._fp8_needs_te = True  # applied once per process


def _single_process_rendezvous() -> dict:
    """torchrun's environment when present; otherwise a one-rank job (``python script.py`` just works)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return {}  # env:// rendezvous from torchrun / Slurm
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"init_method": f"tcp://127.0.0.1:{port}", "rank": 0, "world_size": 1}


def destroy_parallel(shutdown_distributed: bool = False) -> None:
    """Forget megatron's groups and its model-parallel RNG tracker, so ``initialize_parallel`` can run again.

    torch.distributed stays up unless ``shutdown_distributed`` (end of the job).
    """
    from megatron.core import parallel_state  # lazy: keeps the launcher free of megatron
    from megatron.core.tensor_parallel import random as megatron_random  # lazy: keeps the launcher free of megatron

    global _process_device
    parallel_state.destroy_model_parallel()
    _process_device = None
    # The tracker is a module singleton that refuses to be re-seeded once initialised.
    megatron_random._CUDA_RNG_STATE_TRACKER = None
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    if shutdown_distributed and dist.is_initialized():
        dist.destroy_process_group()
