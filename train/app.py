"""``qwen3vl-train``: one pretraining stage of Qwen3-VL on megatron-core, one process per rank.

    torchrun --nproc_per_node N -m qwen3vl.train.app --config-name stage1_mm model=8B run_dir=DIR ...
    (or, with the same arguments after ``--``: qwen3vl-launch --nproc N --recipe stage1_mm -- ...)

The recipe is composed with Hydra's compose API (``qwen3vl.train.config.load_config``) and validated
before any process group exists. Then: process groups for the layout; the model (one chunk per
virtual pipeline stage) with the stage's frozen parts; megatron DDP + ZeRO-1 optimizer with per-part
learning rates; the packed-row loader of this DP rank; resume from ``<run_dir>/checkpoints/latest``
if there is one, else the weights of ``init_from`` (stage hand-off: weights only, any layout); train,
evaluating the held-out sets of ``eval.datasets`` (qwen3vl.train.evaluate); plot the loss. bf16 with a GPU, fp32 on CPU (``train.precision``).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from qwen3vl.train.console import configure_console, filter_known_warnings

# megatron-core warns while it is imported (by the imports below), on every rank: its known, harmless notes
# are filtered first (so these imports follow a call, on purpose). main() then quiets the ranks other than 0.
filter_known_warnings()

from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.optimizer import OptimizerConfig

from qwen3vl.data.loader import build_loader
from qwen3vl.data.shards import absolute_pattern
from qwen3vl.data.trace import TraceWriter, truncate_after, write_datasets
from qwen3vl.model.build import build_model_chunks
from qwen3vl.parallel.context_parallel import model_inputs
from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel, process_device
from qwen3vl.parallel.micro_batch import MicroBatch
from qwen3vl.parallel.zero1 import default_ddp_config, wrap_for_training
from qwen3vl.train.balance import DataParallelBalancer, row_cost
from qwen3vl.train.checkpoint import TrainState, find_latest, load_checkpoint, load_weights
from qwen3vl.train.config import Qwen3VLTrainConfig, load_config, parse_app_argv, run_shape, to_dict, to_yaml
from qwen3vl.train.config_checks import build_model_config
from qwen3vl.train.evaluate import Evaluator
from qwen3vl.train.failure_record import failures_dir
from qwen3vl.train.flops import FlopDims, batch_flops, peak_tflops
from qwen3vl.train.rank_failure import report_rank_failure
from qwen3vl.train.freeze import PartLR, apply_freeze, param_group_overrides
from qwen3vl.train.loop import LoopConfig, LoopHooks, run_training
from qwen3vl.train.metrics import MetricsWriter
from qwen3vl.train.schedule import SCHEDULE_FILE, build_scheduler, plan_file_text, plan_of, resume_changes
from qwen3vl.train.signals import start_helpers_deaf_to_preemption

log = logging.getLogger("qwen3vl.train")


# --- pieces ----------------------------------------------------------------------------------------------
def device_name(cfg: Qwen3VLTrainConfig) -> str:
    """``train.device`` as the name ``qwen3vl.parallel.groups.resolve_device`` takes."""
    return getattr(cfg.train.device, "value", cfg.train.device)


def dtype_of(cfg: Qwen3VLTrainConfig, device: torch.device) -> torch.dtype:
    precision = getattr(cfg.train.precision, "value", cfg.train.precision)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def build_training_chunks(cfg: Qwen3VLTrainConfig, model_config, dtype: torch.dtype,
                          device: torch.device) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) as the run's config wants them, on
    ``device``."""
    chunks = build_model_chunks(model_config, dtype, cfg.parallel.pipeline_layers,
                                calculate_per_token_loss=True, sequence_parallel=cfg.parallel.sequence_parallel,
                                cp_comm_type=cfg.parallel.cp_comm_type, device=device,
                                vision_recompute=cfg.train.recompute.vision, **cfg.train.recompute.megatron_overrides())
    for chunk in chunks:
        if not hasattr(chunk, "model_type"):  # megatron's schedules read it (GPTModel sets it itself)
            chunk.model_type = ModelType.encoder_or_decoder
    return chunks


def build_optimizer(cfg: Qwen3VLTrainConfig, chunks, layout, dtype: torch.dtype):
    """megatron DDP + distributed optimizer (ZeRO-1) with per-part lrs, and the stage's lr schedule."""
    o, s = cfg.optim, cfg.schedule
    part_lrs = {part: PartLR(lr, lr * s.min_lr_ratio) for part, lr in asdict(o.lr).items()}
    max_lr = max(lr.max_lr for lr in part_lrs.values())
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=max_lr, min_lr=max_lr * s.min_lr_ratio, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=True)
    # The per-part groups go into the one optimizer build (a second build would double start-up memory).
    ddp = default_ddp_config(cfg.parallel.overlap_grad_reduce, cfg.parallel.ddp_bucket_size)
    ddp_chunks, optimizer = wrap_for_training(chunks, layout, opt_cfg, ddp_config=ddp,
                                              config_overrides=param_group_overrides(part_lrs))
    for chunk in ddp_chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
    return ddp_chunks, optimizer, build_scheduler(optimizer, plan_of(cfg), o.weight_decay)


def dataset_summary(loader_cfg) -> list[dict]:
    """Each dataset's name, weight and absolute shard pattern: logged once, and in metrics.jsonl's first line."""
    return [{"name": d.name, "weight": d.weight, "shards": absolute_pattern(d.path)} for d in loader_cfg.datasets]


def microbatch_converter(device: torch.device):
    """A packed row -> this CP rank's micro-batch on ``device``."""
    def to_microbatch(batch) -> MicroBatch:
        inputs = model_inputs(batch, cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size())
        return inputs.to(device, non_blocking=True, media=False)  # pixels go when the vision tower runs

    return to_microbatch


def forward_microbatch(model, mb: MicroBatch) -> torch.Tensor:
    """The model call of one micro-batch: per-token loss on the last stage, hidden states elsewhere."""
    return model(**mb.model_kwargs())


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
    shape = run_shape(cfg, dist.get_world_size())
    device = process_device()
    dtype = dtype_of(cfg, device)
    model_config = build_model_config(cfg)
    chunks = build_training_chunks(cfg, model_config, dtype, device)
    trainable = list(cfg.train.trainable)
    apply_freeze(chunks, "all" if "all" in trainable else trainable)
    ddp_chunks, optimizer, scheduler = build_optimizer(cfg, chunks, cfg.parallel.layout(), dtype)
    return TrainingSetup(cfg, shape, dtype, model_config, ddp_chunks, optimizer, scheduler, device)


def loop_config(setup: TrainingSetup) -> LoopConfig:
    t = setup.cfg.train
    return LoopConfig(steps=setup.shape.steps, num_microbatches=setup.shape.num_microbatches,
                      exponent=t.loss_exponent, save_interval=t.save_interval, keep_last_k=t.keep_last_k,
                      max_consecutive_nan=t.max_consecutive_nan, stop_at_step=t.stop_at_step,
                      stop_after_s=t.stop_after_minutes * 60 if t.stop_after_minutes is not None else None,
                      # The limit counts from the start of this rank's process (imports and model build included).
                      started_at=psutil.Process().create_time(), async_save=t.async_save,
                      eval_interval=setup.cfg.eval.interval, eval_at_start=setup.cfg.eval.at_start,
                      eval_end_step=setup.shape.total_steps if setup.cfg.eval.at_end else None)


def build_evaluator(setup: TrainingSetup, hooks: LoopHooks, metrics=None):
    """The held-out evaluation of ``eval.datasets`` (qwen3vl.train.evaluate) through the loop's own
    micro-batch conversion and model call; None without held-out sets. Collective (the demo corpus)."""
    cfg = setup.cfg
    if not cfg.eval.datasets:
        return None
    eval_sets = cfg.eval.eval_sets(cfg.data, cfg.train.seq_length, setup.shape.pad_multiple)
    return Evaluator(eval_sets, setup.model_chunks, hooks.to_microbatch, hooks.run_model,
                     exponent=cfg.train.loss_exponent, microbatch_multiple=cfg.parallel.layout().microbatch_multiple,
                     report=metrics.eval if metrics is not None else None)


def loop_hooks(setup: TrainingSetup, loader=None, trace=None) -> LoopHooks:
    dims = FlopDims.from_model_config(setup.model_config)
    trainable = list(setup.cfg.train.trainable)
    balance = None
    if setup.cfg.data.balance and ps.get_data_parallel_world_size() > 1:
        device = setup.device if dist.get_backend() == "nccl" else torch.device("cpu")
        balance = DataParallelBalancer(lambda row: row_cost(dims, row, trainable), ps.get_data_parallel_group(), device)
    return LoopHooks(to_microbatch=microbatch_converter(setup.device), run_model=forward_microbatch, count=count_row,
                     flops=lambda b: batch_flops(dims, b, trainable).total,
                     loader_state=loader.state_dict if loader is not None else (lambda: None),
                     skipped_counts=loader.skipped_counts if loader is not None else dict,
                     config_yaml=to_yaml(setup.cfg, in_run_dir=True), balance=balance,
                     checkpoint_files={SCHEDULE_FILE: plan_file_text(plan_of(setup.cfg))},
                     trace=trace.write if trace is not None else None)


def open_data_trace(cfg: Qwen3VLTrainConfig, loader, start_step: int):
    """``data.trace``: one writer per data-parallel replica (its TP/PP/CP rank 0); rank 0 first drops the
    lines of steps the resumed state has not seen and lists the datasets' shards. Collective."""
    if not cfg.data.trace:
        return None
    if dist.get_rank() == 0:
        truncate_after(cfg.run_dir, start_step)
        write_datasets(cfg.run_dir, {d.name: urls for d, urls in zip(loader.cfg.datasets, loader.urls)})
    dist.barrier()
    writer = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
              and ps.get_context_parallel_rank() == 0)
    return TraceWriter(cfg.run_dir, dist.get_rank()) if writer else None


@dataclass
class Start:
    """Where a run starts: its counters, and the schedule change a replanned resume made (else None)."""

    state: TrainState
    replanned: dict | None = None


def resume_or_init(setup: TrainingSetup, loader=None) -> Start:
    """Resume from the run's latest checkpoint, else load ``init_from`` weights, else start fresh."""
    cfg = setup.cfg
    latest = find_latest(cfg.run_dir)
    if latest is not None:
        # load_config refused a changed schedule unless schedule.on_resume=replan; this is the replan.
        saved, changes = resume_changes(cfg, latest)
        resumed = load_checkpoint(latest, setup.model_chunks, setup.optimizer, setup.scheduler)
        data = resumed.loader_state  # this DP rank's state, or every saved rank's under another layout
        if loader is not None and data is not None and not (isinstance(data, list) and None in data):
            loader.load_state_dict(data)
        log.warning("resumed %s at step %d", latest, resumed.state.step)
        replanned = None
        if changes:
            replanned = {"saved": saved.to_dict(), "new": plan_of(cfg).to_dict(), "changes": changes}
            log.warning("schedule replanned from step %d (schedule.on_resume=replan): %s", resumed.state.step,
                        "; ".join(changes))
        return Start(resumed.state, replanned)
    if cfg.init_from:
        log.warning("initialised weights from %s", load_weights(cfg.init_from, setup.model_chunks))
    return Start(TrainState())


def train(cfg: Qwen3VLTrainConfig) -> str:
    """Runs the stage described by ``cfg`` on this rank; returns "done" or "preempted". Collective."""
    start_helpers_deaf_to_preemption()  # before the data workers, whose semaphores start it otherwise
    device = initialize_parallel(cfg.parallel.layout(), seed=cfg.train.seed, device=device_name(cfg))
    loader = trace = None
    try:
        setup = build_training(cfg)
        data_cfg = cfg.data.loader_config()
        datasets = dataset_summary(data_cfg)
        if dist.get_rank() == 0:
            for d in datasets:
                log.warning("dataset %r (weight %g): %s", d["name"], d["weight"], d["shards"])
        loader = build_loader(data_cfg, seq_length=cfg.train.seq_length,
                              pad_multiple=setup.shape.pad_multiple, dp_rank=ps.get_data_parallel_rank(),
                              dp_size=ps.get_data_parallel_world_size(), num_workers=cfg.data.num_workers,
                              seed=cfg.train.seed)
        start = resume_or_init(setup, loader)
        state = start.state
        trace = open_data_trace(cfg, loader, state.step)
        rank = dist.get_rank()
        run_info = {"backend": dist.get_backend(), "device": device.type}
        if rank == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.yaml").write_text(to_yaml(cfg, in_run_dir=True))
            print(f"[qwen3vl-train] {dist.get_world_size()} rank(s) on {device.type} ({run_info['backend']}), "
                  f"{str(setup.dtype).removeprefix('torch.')}", flush=True)
        loop = loop_config(setup)
        metrics = MetricsWriter(cfg.run_dir, total_steps=loop.last_step, horizon=setup.shape.total_steps,
                                start_step=state.step, world_size=dist.get_world_size(),
                                peak_tflops=peak_tflops(precision="bf16" if setup.dtype == torch.bfloat16 else "fp32"),
                                enabled=rank == 0, wandb_cfg=cfg.wandb, config=to_dict(cfg), label=cfg.stage,
                                first_line={"datasets": datasets}, log_interval=cfg.train.log_interval)
        if start.replanned is not None:
            metrics.event("schedule_replanned", state.step, **start.replanned)
        hooks = loop_hooks(setup, loader, trace)
        hooks.evaluate = build_evaluator(setup, hooks, metrics)
        outcome = run_training(cfg.run_dir, setup.model_chunks, setup.optimizer, setup.scheduler, loader, state,
                               loop, hooks, metrics, run_info=run_info)
        plot = metrics.close(plot=True)
        if rank == 0:
            print(f"[qwen3vl-train] {outcome} at step {state.step}; loss plot: {plot}", flush=True)
        return outcome
    finally:
        if trace is not None:
            trace.close()
        if loader is not None:
            loader.close()
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    configure_console(int(os.environ.get("RANK", "0")))  # ranks other than 0: errors only
    recipe, overrides = parse_app_argv(sys.argv[1:] if argv is None else argv)
    cfg = load_config(recipe, overrides)
    if device_name(cfg) == "cpu":
        # Before anything asks CUDA (it reads this once): a CPU run on a GPU host must not see the GPUs, or
        # megatron would allocate on them (its CPU backend applies only where no GPU is visible).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        train(cfg)
    except Exception as exc:  # noqa: BLE001 - recorded for the launcher's last line, then exit 1
        return report_rank_failure(failures_dir(cfg.run_dir), exc)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
