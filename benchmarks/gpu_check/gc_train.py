"""P4/P6/P7: a Qwen3-VL training run on this device with the project's own model, ZeRO-1 wrapper, step,
loop, FLOP count and metrics, on synthetic packed rows (no data pipeline): tokens/s, TFLOP/s/GPU and MFU
(medians after the warm-up steps), peak memory; optionally the host-device syncs of one step (by call site)
and a profile of one step (kernel-time shares).

    python gc_train.py --preset 2B --seq 8192 --steps 10 --recompute none|selective|full [--syncs] [--profile]
"""
import argparse
import os
import statistics
import time
import warnings
from dataclasses import replace

import torch
from gc_common import DEVICE, ON_GPU, OUT, patch_te_general_gemm, record
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from qwen3vl.model.attention_kernels import resolve_kernel
from qwen3vl.model.build import build_model_chunks
from qwen3vl.model.presets import get_preset
from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.parallel.zero1 import wrap_for_training
from qwen3vl.train.app import forward_microbatch, microbatch_converter
from qwen3vl.train.checkpoint import TrainState
from qwen3vl.train.flops import FlopDims, batch_flops, peak_tflops
from qwen3vl.train.freeze import PartLR, apply_freeze, param_group_overrides
from qwen3vl.train.loop import LoopConfig, LoopHooks, run_training
from qwen3vl.train.metrics import MetricsWriter, read_metrics
from qwen3vl.train.step import train_step
from qwen3vl_testing.model_cases import SampleBuilder, pack_samples

p = argparse.ArgumentParser()
p.add_argument("--preset", default="2B")
p.add_argument("--seq", type=int, default=8192)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
p.add_argument("--profile", action="store_true")
p.add_argument("--syncs", action="store_true", help="count host-device syncs of one step (sync debug mode)")
args = p.parse_args()
patch_te_general_gemm()  # F2, for MoE presets
dtype = torch.bfloat16 if ON_GPU else torch.float32
config = get_preset(args.preset)


def make_rows(n_rows: int, seq: int) -> list:
    """Rows of 8 samples, each with one image (~1K patches at 8K rows: 256 LLM tokens), so every row has
    media (a text-only row would trip F1 under overlap_grad_reduce; gc_ddp_probe.py probes that)."""
    per = seq // 8
    shapes = [(32, 32), (24, 40), (40, 24), (16, 64), (32, 32), (28, 36), (36, 28), (32, 32)]
    if per < 512:  # dry runs with short rows
        shapes = [(8, 8), (4, 12), (12, 4), (4, 16), (8, 8), (8, 8), (8, 8), (8, 8)]
    rows = []
    for r in range(n_rows):
        samples = []
        for i, (h, w) in enumerate(shapes):
            visual, prefix = h * w // 4 + 2, 16 + 8 * i
            builder = SampleBuilder(config, seed=1000 * r + i).text(prefix).image(h, w)
            samples.append(builder.text(per - prefix - visual).build())
        rows.append(pack_samples(samples, pad_multiple=2))
    return rows


def count_row(batch):
    real = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    return int((real > 0).sum()), int(real.sum())


initialize_parallel(ParallelLayout())
recompute = {"selective": dict(recompute_granularity="selective", recompute_modules=["layernorm", "mlp"]),
             "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}
t0 = time.time()
chunks = build_model_chunks(config, dtype, calculate_per_token_loss=True, vision_recompute=args.recompute == "full",
                            **recompute.get(args.recompute, {}))
param_devices = sorted({p.device.type for p in chunks[0].parameters()})
for chunk in chunks:
    chunk.to(DEVICE)  # as train/app.py does
apply_freeze(chunks, "all")
n_params = sum(p.numel() for p in chunks[0].parameters())
lrs = {"vision": PartLR(2e-5, 2e-6), "merger": PartLR(1e-4, 1e-5), "llm": PartLR(1e-4, 1e-5)}
opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=1e-5, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                          adam_eps=1e-8, clip_grad=1.0, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                          use_distributed_optimizer=True)
ddp_chunks, optimizer = wrap_for_training(chunks, ParallelLayout(), opt_cfg, config_overrides=param_group_overrides(lrs))
for chunk in ddp_chunks:
    chunk.config.grad_scale_func = optimizer.scale_loss
total = args.warmup + args.steps
scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-4, min_lr=1e-5, lr_warmup_steps=2,
                                    lr_decay_steps=total + 1, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=total, wd_incr_style="constant",
                                    use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
build_s = time.time() - t0
static_gib = None
if ON_GPU:
    torch.cuda.synchronize()
    static_gib = torch.cuda.memory_allocated() / 2**30
rows = make_rows(4, args.seq)
dims = FlopDims.from_model_config(config)


def loader():
    i = 0
    while True:
        yield rows[i % len(rows)]
        i += 1


to_microbatch = microbatch_converter(DEVICE)  # the trainer's own: CP share, pixels moved when the tower runs


run_dir = os.path.join(os.environ.get("GC_RUNS", OUT), f"run_{args.preset}_{args.seq}_{args.recompute}")
os.makedirs(run_dir, exist_ok=True)
metrics = MetricsWriter(run_dir, total_steps=total, world_size=1, peak_tflops=peak_tflops() if ON_GPU else None,
                        enabled=True, label=f"{args.preset}/{args.recompute}")
hooks = LoopHooks(to_microbatch=to_microbatch, run_model=forward_microbatch, count=count_row,
                  flops=lambda b: batch_flops(dims, b).total)
if ON_GPU:
    torch.cuda.reset_peak_memory_stats()
run_training(run_dir, ddp_chunks, optimizer, scheduler, loader(), TrainState(),
             LoopConfig(steps=total, num_microbatches=1, save_at_end=False), hooks, metrics)
peak_gib = torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None
lines = read_metrics(run_dir)
measured = lines[args.warmup:]


def median(key):
    values = [r[key] for r in measured if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


metrics_peak = [r.get("peak_memory_gib") for r in lines if r.get("peak_memory_gib") is not None]
row_flops = batch_flops(dims, rows[0])
record("train", preset=args.preset, seq=args.seq, recompute=args.recompute, params=n_params,
       param_devices_after_build=param_devices, build_s=round(build_s, 1),
       kernel=resolve_kernel("auto", dtype, device=DEVICE), static_mem_gib=static_gib, peak_mem_gib=peak_gib,
       metrics_peak_memory_gib=metrics_peak[-1] if metrics_peak else None, steps_measured=len(measured),
       step_time_s=median("step_time_s"), tokens_per_s=median("tokens_per_s"), tflops_per_s=median("tflops_per_s"),
       mfu=median("mfu"), row_tflop=round(row_flops.total / 1e12, 2),
       row_tflop_by_part={k: round(v / 1e12, 2) for k, v in row_flops.by_part.items()},
       first_step_s=lines[0]["step_time_s"] if lines else None, losses=[round(r["loss"], 4) for r in lines],
       peak_tflops=peak_tflops() if ON_GPU else None, device=torch.cuda.get_device_name() if ON_GPU else "cpu")


def one_step():
    mb = to_microbatch(rows[0])
    return train_step(ddp_chunks, optimizer, scheduler, [mb], forward_microbatch, exponent=0.5)


if args.syncs and ON_GPU:
    # Every synchronizing CUDA call of one training step, grouped by the warning's call site.
    from collections import Counter

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
    record("syncs_per_step", total=len(syncs), by_site=dict(sites.most_common(25)))

if args.profile and ON_GPU:
    from torch.profiler import ProfilerActivity, profile

    one_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    with open(os.path.join(OUT, f"profile_{args.preset}_{args.recompute}.txt"), "w") as f:
        f.write(table)
    events = prof.key_averages()

    def device_time(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    cuda_total = sum(device_time(e) for e in events)

    def share(pred):
        return round(sum(device_time(e) for e in events if pred(e.key.lower())) / max(cuda_total, 1), 3)

    record("profile", cuda_time_ms=round(cuda_total / 1e3, 1),
           gemm_share=share(lambda k: any(s in k for s in ("gemm", "cutlass", "matmul", "nvjet", "sm90"))),
           flash_share=share(lambda k: any(s in k for s in ("flash", "fmha", "attention"))),
           elementwise_share=share(lambda k: any(s in k for s in ("elementwise", "vectorized", "reduce", "triton"))),
           index_share=share(lambda k: any(s in k for s in ("index", "scatter", "gather"))),
           memcpy_share=share(lambda k: "memcpy" in k or "memset" in k))
destroy_parallel()
