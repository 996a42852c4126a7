"""P3: F1, megatron DDP with overlap_grad_reduce (the GPU default) when a step's row has no media after a
step with media: the vision parameters fire no gradient hook, and megatron's bucket bookkeeping asserts.
The same three bf16 steps of the tiny model with the GPU default, then with overlap off."""
import os
import traceback
from dataclasses import replace

import torch
from gc_common import DEVICE, ON_GPU, error_text, one_rank, patch_te_general_gemm, record
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from qwen3vl.model.build import build_model_chunks
from qwen3vl.parallel.groups import destroy_parallel
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.parallel.zero1 import default_ddp_config, wrap_for_training
from qwen3vl.train.app import forward_microbatch, microbatch_converter
from qwen3vl.train.step import train_step
from qwen3vl_testing.model_cases import SampleBuilder, named_config, pack_samples

patch_te_general_gemm()
dtype = torch.bfloat16 if ON_GPU else torch.float32


def rows(config):
    media = pack_samples([SampleBuilder(config, seed=1).text(5).image(4, 4).text(20).build()], pad_multiple=2)
    text = pack_samples([SampleBuilder(config, seed=2).text(media.seq_length).build()], pad_multiple=2)
    return [("media", media), ("text-only", text), ("media", media)]


def probe(overlap: bool):
    one_rank()
    config = named_config("tiny")
    [model] = build_model_chunks(config, dtype, calculate_per_token_loss=True)
    model.to(DEVICE)
    opt = OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=1e-5, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                          use_distributed_optimizer=True, clip_grad=1.0)
    chunks, optimizer = wrap_for_training([model], ParallelLayout(), opt,
                                          ddp_config=replace(default_ddp_config(), overlap_grad_reduce=overlap))
    chunks[0].config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-4, min_lr=1e-5, lr_warmup_steps=1,
                                        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=10, wd_incr_style="constant")
    done, error = [], None
    try:
        for kind, batch in rows(config):
            mb = microbatch_converter(DEVICE)(batch)  # the trainer's own conversion and model call
            result = train_step(chunks, optimizer, scheduler, [mb], forward_microbatch, exponent=0.5)
            done.append((kind, round(result.losses["lm loss"], 4)))
    except BaseException as err:  # noqa: BLE001 - the predicted failure is an AssertionError
        error = error_text(err)
        if os.environ.get("GC_DEBUG"):
            traceback.print_exc()
    finally:
        destroy_parallel()
    return done, error


for overlap in (True, False):
    done, error = probe(overlap)
    record("ddp_overlap_probe", overlap_grad_reduce=overlap, steps_done=done, error=error,
           F1_reproduced=bool(overlap and error and "params have grad available" in error))
