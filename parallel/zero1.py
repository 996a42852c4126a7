"""Data parallelism with ZeRO-1: megatron's DistributedDataParallel plus its DistributedOptimizer.

Gradients live in contiguous buffers that are reduce-scattered over the data-parallel group; each
rank keeps the fp32 main parameters and Adam moments of its 1/dp shard only, steps it, and
all-gathers the updated parameters. The same call serves CPU fp32 runs and GPU bf16 runs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

from qwen3vl.parallel.layout import ParallelLayout


def default_ddp_config(overlap_grad_reduce: bool = True, bucket_size: Optional[int] = None
                       ) -> DistributedDataParallelConfig:
    """megatron DDP as a GPU run uses it, and the same on CPU: fp32 gradient reduction, the optimizer
    sharded (ZeRO-1), and the gradient reduce-scatter overlapped with the backward pass, launched per bucket
    as soon as every parameter of the bucket has its gradient. ``bucket_size`` (parameters per bucket) None
    is megatron's default, max(40M, 1M·dp). With overlap every trainable parameter must get a gradient on
    the last micro-batch of every step (megatron checks it per bucket): the model gives its vision tower
    a zero-weight dummy input on rows without media for that (``Qwen3VLModel``)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=False,
        bucket_size=bucket_size,
    )


def wrap_for_training(model_chunks: Sequence[torch.nn.Module], layout: ParallelLayout,
                      optimizer_config: OptimizerConfig,
                      ddp_config: Optional[DistributedDataParallelConfig] = None,
                      config_overrides: Optional[dict[Any, Any]] = None,
                      ) -> tuple[list[DistributedDataParallel], MegatronOptimizer]:
    """Wrap each model chunk (one per virtual pipeline stage) in DDP and build the ZeRO-1 optimizer.

    bf16/fp16 chunks (``optimizer_config.bf16``/``fp16``) are first wrapped in megatron's Float16Module
    so the optimizer keeps fp32 main weights. Also installs on the model config the hooks megatron's
    schedules call (gradient sync deferral and ``finalize_model_grads``).

    ``config_overrides`` is megatron's per-parameter-group override map (``ParamKey`` ->
    ``ParamGroupOverride``, e.g. ``{"max_lr": ..., "min_lr": ..., "wd_mult": 0.0}``), passed straight to
    ``get_megatron_optimizer`` so the optimizer is built once, already split into the caller's groups.

    Returns:
        (DDP-wrapped chunks, optimizer); call ``chunk.zero_grad_buffer()`` on every chunk and
        ``optimizer.zero_grad()`` before each step, then ``optimizer.step()`` after forward/backward.
    """
    ddp_config = ddp_config or default_ddp_config()
    if not ddp_config.use_distributed_optimizer:
        ddp_config = replace(ddp_config, use_distributed_optimizer=True)
    if not optimizer_config.use_distributed_optimizer:
        optimizer_config = replace(optimizer_config, use_distributed_optimizer=True)
    half = optimizer_config.bf16 or optimizer_config.fp16
    ddp_chunks = []
    for index, chunk in enumerate(model_chunks):
        config = get_model_config(chunk)
        if half and not isinstance(chunk, Float16Module):
            chunk = Float16Module(config, chunk)
        ddp_chunks.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # Megatron buckets only the first chunk; later chunks overlap with earlier chunks' compute.
            disable_bucketing=index > 0))
    config = get_model_config(ddp_chunks[0])
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        optimizer_config, ddp_chunks, config_overrides=config_overrides,
        # Extra gloo copies of the DP groups exist only on NCCL runs (see groups.initialize_parallel).
        use_gloo_process_groups=dist.get_backend() == "nccl")
    return ddp_chunks, optimizer
