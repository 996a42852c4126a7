"""Process groups: torch.distributed plus megatron-core's parallel_state for one ``ParallelLayout``.

``initialize_parallel`` is the one place a process joins the job: it starts torch.distributed from
the torchrun environment when needed (NCCL with a GPU, gloo without), switches megatron to the CPU
backend when there is no GPU, builds the TP/PP/CP/EP/DP groups and seeds the model-parallel RNG.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from qwen3vl.parallel import cpu_backend
from qwen3vl.parallel.layout import LayoutError, ParallelLayout


def initialize_parallel(layout: ParallelLayout, seed: int = 1234, timeout_s: float = 1800.0) -> None:
    """Join the job and build megatron's process groups for ``layout``.

    Args:
        layout: the degrees; the world size must be a multiple of tp·pp·cp (and etp·ep·pp).
        seed: base seed; megatron derives the per-TP-rank / per-EP-rank / data-parallel seeds from it.
        timeout_s: collective timeout, also used when this call starts torch.distributed.
    """
    has_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        if has_gpu:  # one process per GPU, as torchrun sets LOCAL_RANK
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if has_gpu else "gloo", timeout=timedelta(seconds=timeout_s),
                                **_single_process_rendezvous())
    if not has_gpu:
        cpu_backend.enable()
    world_size = dist.get_world_size()
    if world_size % layout.model_parallel_size:
        raise LayoutError([f"world size {world_size} is not divisible by tp·pp·cp = "
                           f"{layout.model_parallel_size}: use a multiple of it or reduce tp, pp or cp"])

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

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
        create_gloo_process_groups=has_gpu,
    )
    model_parallel_cuda_manual_seed(seed)


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
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    parallel_state.destroy_model_parallel()
    # The tracker is a module singleton that refuses to be re-seeded once initialised.
    megatron_random._CUDA_RNG_STATE_TRACKER = None
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    if shutdown_distributed and dist.is_initialized():
        dist.destroy_process_group()
