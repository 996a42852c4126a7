"""``qwen3vl-train``: one pretraining stage of Qwen3-VL on megatron-core, one process per rank.

    torchrun --nproc_per_node N -m qwen3vl.train.app --config-name stage1_mm model=8B run_dir=DIR ...
    (or, with the same arguments after ``--``: qwen3vl-launch --nproc N --recipe stage1_mm -- ...)

The recipe is composed with Hydra's compose API (``qwen3vl.train.config.load_config``) and validated
before any process group exists. Then: process groups for the layout; the model (one chunk per
virtual pipeline stage) with the stage's frozen parts; megatron DDP + ZeRO-1 optimizer with per-part
learning rates; the packed-row loader of this DP rank; resume from ``<run_dir>/checkpoints/latest``
if there is one, else the weights of ``init_from`` (stage hand-off: weights only, any layout); train;
plot the loss. bf16 with a GPU, fp32 on CPU (``train.precision``).
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwen3vl.train.checkpoint import TrainState, find_latest, load_checkpoint, load_weights
from qwen3vl.train.config import Qwen3VLTrainConfig, load_config, parse_app_argv, run_shape, to_yaml
from qwen3vl.train.freeze import PartLR, apply_freeze, param_group_overrides
from qwen3vl.train.loop import LoopConfig, LoopHooks, run_training

log = logging.getLogger("qwen3vl.train")
DEMO_SUBSETS = ("caption", "video", "interleaved", "text")  # the held-out split stays out of training
DEMO_WEIGHTS = {"caption": 4.0, "video": 1.0, "interleaved": 1.0, "text": 1.0}


# --- pieces ----------------------------------------------------------------------------------------------
def dtype_of(cfg: Qwen3VLTrainConfig) -> torch.dtype:
    precision = getattr(cfg.train.precision, "value", cfg.train.precision)
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def layout_of(cfg: Qwen3VLTrainConfig):
    from qwen3vl.parallel.layout import ParallelLayout

    p = cfg.parallel
    return ParallelLayout(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, etp=p.etp,
                          sequence_parallel=p.sequence_parallel)


def recompute_overrides(cfg: Qwen3VLTrainConfig) -> dict[str, Any]:
    r = cfg.train.recompute
    if r.granularity is None:
        return {}
    if r.granularity == "selective":
        return dict(recompute_granularity="selective")
    return dict(recompute_granularity="full", recompute_method=r.method, recompute_num_layers=r.num_layers)


def build_model_chunks(cfg: Qwen3VLTrainConfig, model_config, dtype: torch.dtype) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), on the GPU when there is one."""
    from megatron.core.enums import ModelType

    from qwen3vl.model import build

    chunks = build.build_model_chunks(model_config, dtype, cfg.parallel.pipeline_layers,
                                      calculate_per_token_loss=True, sequence_parallel=cfg.parallel.sequence_parallel,
                                      vision_recompute=cfg.train.recompute.vision, **recompute_overrides(cfg))
    for chunk in chunks:
        if not hasattr(chunk, "model_type"):  # megatron's schedules read it (GPTModel sets it itself)
            chunk.model_type = ModelType.encoder_or_decoder
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
    return chunks


def build_optimizer(cfg: Qwen3VLTrainConfig, chunks, layout, dtype: torch.dtype, steps: int, warmup: int):
    """megatron DDP + distributed optimizer (ZeRO-1) with per-part lrs, and its lr schedule."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from qwen3vl.parallel.zero1 import wrap_for_training

    o, s = cfg.optim, cfg.schedule
    part_lrs = {part: PartLR(lr, lr * s.min_lr_ratio) for part, lr in asdict(o.lr).items()}
    max_lr = max(lr.max_lr for lr in part_lrs.values())
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=max_lr, min_lr=max_lr * s.min_lr_ratio, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=True)
    # The per-part groups go into the one optimizer build (a second build would double start-up memory).
    ddp_chunks, optimizer = wrap_for_training(chunks, layout, opt_cfg,
                                              config_overrides=param_group_overrides(part_lrs))
    for chunk in ddp_chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
    style = getattr(s.decay_style, "value", s.decay_style)
    wsd = dict(wsd_decay_steps=max(1, int(s.wsd_decay_fraction * steps)), lr_wsd_decay_style="linear") \
        if style == "wsd" else {}
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=max_lr, min_lr=max_lr * s.min_lr_ratio, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style={"wsd": "WSD"}.get(style, style),
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant",
        # The config wins over the checkpoint: rerunning a stage with more train.steps stretches its schedule.
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True, **wsd)
    return ddp_chunks, optimizer, scheduler


def loader_config(cfg: Qwen3VLTrainConfig):
    """The data section as the loader's config; ``shards: demo`` is the demo corpus (built on first use)."""
    from qwen3vl.data.loader import DatasetSpec, LoaderConfig
    from qwen3vl.data.processing_config import ProcessingConfig

    datasets = []
    for d in cfg.data.datasets:
        if d.shards == "demo":
            manifest = ensure_demo_corpus(cfg.data.demo_dir)
            datasets += [DatasetSpec(manifest["subsets"][k]["pattern"], d.weight * DEMO_WEIGHTS[k]) for k in DEMO_SUBSETS]
        else:
            datasets.append(DatasetSpec(d.shards, d.weight))
    return LoaderConfig(datasets=datasets, shuffle_buffer=cfg.data.shuffle_buffer, pack_buffer=cfg.data.pack_buffer,
                        max_patches_per_row=cfg.data.max_patches_per_row,
                        processing=ProcessingConfig(**dict(cfg.data.processing)), tokenizer_path=cfg.data.tokenizer,
                        max_consecutive_failures=cfg.data.max_consecutive_failures)


def ensure_demo_corpus(demo_dir: str) -> dict:
    """Rank 0 writes the demo corpus once; the others wait for it. Returns its manifest."""
    from qwen3vl.data.demo import write_demo

    manifest = Path(demo_dir) / "manifest.json"
    if (not dist.is_initialized() or dist.get_rank() == 0) and not manifest.is_file():
        write_demo(demo_dir)
    if dist.is_initialized():
        dist.barrier()
    return json.loads(manifest.read_text())


def microbatch_fn(device: torch.device):
    """A packed row -> this CP rank's model inputs on ``device``."""
    from dataclasses import fields, is_dataclass, replace

    from megatron.core import parallel_state as ps

    from qwen3vl.parallel.context_parallel import model_inputs

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if is_dataclass(x):  # PackedSeqParams: cu_seqlens tensors, max_seqlen ints
            return replace(x, **{f.name: move(getattr(x, f.name)) for f in fields(x) if f.init})
        return x

    def to_microbatch(batch) -> dict[str, Any]:
        inputs = model_inputs(batch, cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size())
        return {k: move(v) for k, v in inputs.items()}

    return to_microbatch


def run_qwen3vl(model, mb: dict[str, Any]) -> torch.Tensor:
    """The model call of one micro-batch: per-token loss on the last stage, hidden states elsewhere."""
    return model(**mb)


def count_row(batch) -> tuple[int, int]:
    """(samples, real tokens) of one packed row."""
    real = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    return int((real > 0).sum()), int(real.sum())


# --- the run ---------------------------------------------------------------------------------------------
@dataclass
class TrainingSetup:
    """Everything built for one rank, before the loop (tests drive the loop from here too)."""

    cfg: Qwen3VLTrainConfig
    shape: Any  # qwen3vl.train.config.RunShape
    dtype: torch.dtype
    model_config: Any  # qwen3vl.model.config.Qwen3VLConfig
    model_chunks: list  # megatron DDP-wrapped chunks
    optimizer: Any
    scheduler: Any
    device: torch.device


def build_training(cfg: Qwen3VLTrainConfig) -> TrainingSetup:
    """Model, frozen parts, DDP + ZeRO-1 optimizer and schedule. Needs ``initialize_parallel`` first."""
    from qwen3vl.train.config_checks import build_model_config

    shape = run_shape(cfg, dist.get_world_size())
    dtype = dtype_of(cfg)
    model_config = build_model_config(cfg)
    chunks = build_model_chunks(cfg, model_config, dtype)
    trainable = list(cfg.train.trainable)
    apply_freeze(chunks, "all" if "all" in trainable else trainable)
    ddp_chunks, optimizer, scheduler = build_optimizer(cfg, chunks, layout_of(cfg), dtype, shape.steps,
                                                       shape.warmup_steps)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return TrainingSetup(cfg, shape, dtype, model_config, ddp_chunks, optimizer, scheduler, device)


def loop_config(setup: TrainingSetup) -> LoopConfig:
    t = setup.cfg.train
    return LoopConfig(steps=setup.shape.steps, num_microbatches=setup.shape.num_microbatches,
                      exponent=t.loss_exponent, save_interval=t.save_interval, keep_last_k=t.keep_last_k,
                      max_consecutive_nan=t.max_consecutive_nan)


def loop_hooks(setup: TrainingSetup, loader=None) -> LoopHooks:
    from qwen3vl.train.flops import FlopDims, batch_flops

    dims = FlopDims.from_model_config(setup.model_config)
    trainable = list(setup.cfg.train.trainable)
    return LoopHooks(to_microbatch=microbatch_fn(setup.device), run_model=run_qwen3vl, count=count_row,
                     flops=lambda b: batch_flops(dims, b, trainable).total,
                     loader_state=loader.state_dict if loader is not None else (lambda: None),
                     skipped_counts=loader.skipped_counts if loader is not None else dict,
                     config_yaml=to_yaml(setup.cfg))


def resume_or_init(setup: TrainingSetup, loader=None) -> TrainState:
    """Resume from the run's latest checkpoint, else load ``init_from`` weights, else start fresh."""
    cfg = setup.cfg
    latest = find_latest(cfg.run_dir)
    if latest is not None:
        resumed = load_checkpoint(latest, setup.model_chunks, setup.optimizer, setup.scheduler)
        if resumed.loader_state is not None and loader is not None:
            loader.load_state_dict(resumed.loader_state)
        log.warning("resumed %s at step %d", latest, resumed.state.step)
        return resumed.state
    if cfg.init_from:
        log.warning("initialised weights from %s", load_weights(cfg.init_from, setup.model_chunks))
    return TrainState()


def train(cfg: Qwen3VLTrainConfig) -> str:
    """Runs the stage described by ``cfg`` on this rank; returns "done" or "preempted". Collective."""
    from megatron.core import parallel_state as ps

    from qwen3vl.data.loader import build_loader
    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.train.flops import peak_tflops
    from qwen3vl.train.metrics import MetricsWriter

    initialize_parallel(layout_of(cfg), seed=cfg.train.seed)
    loader = None
    try:
        setup = build_training(cfg)
        loader = build_loader(loader_config(cfg), seq_length=cfg.train.seq_length,
                              pad_multiple=setup.shape.pad_multiple, dp_rank=ps.get_data_parallel_rank(),
                              dp_size=ps.get_data_parallel_world_size(), num_workers=cfg.data.num_workers,
                              seed=cfg.train.seed)
        state = resume_or_init(setup, loader)
        rank = dist.get_rank()
        if rank == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.yaml").write_text(to_yaml(cfg))
        metrics = MetricsWriter(cfg.run_dir, total_steps=setup.shape.steps, start_step=state.step,
                                world_size=dist.get_world_size(),
                                peak_tflops=peak_tflops(precision="bf16" if setup.dtype == torch.bfloat16 else "fp32"),
                                enabled=rank == 0, wandb_cfg=cfg.wandb, label=cfg.stage)
        outcome = run_training(cfg.run_dir, setup.model_chunks, setup.optimizer, setup.scheduler, loader, state,
                               loop_config(setup), loop_hooks(setup, loader), metrics)
        plot = metrics.close(plot=True)
        if rank == 0:
            print(f"[qwen3vl-train] {outcome} at step {state.step}; loss plot: {plot}", flush=True)
        return outcome
    finally:
        if loader is not None:
            loader.close()
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    recipe, overrides = parse_app_argv(sys.argv[1:] if argv is None else argv)
    cfg = load_config(recipe, overrides)
    train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
