"""``qwen3vl-convert verify``: transformers' Qwen3-VL and ours on one fixed multimodal sample.

First every weight is compared, one mapping of the weight table at a time (the HF tensor against the one
made from the checkpoint's regions): ``weights: max_abs_diff=<float> over <n> tensors``. Then our model
runs under the requested TP/PP/EP/CP layout (the checkpoint is resharded on load); its logits are
gathered over the vocabulary (TP) and the sequence (CP) onto the last pipeline stage, where one rank has
run transformers' model from ``--hf`` first (and freed it: the two models are never in memory together)
and takes the largest absolute logit difference over the sample's tokens. The command prints
``max_abs_diff=<float>`` as its last line.

With more than one rank the command starts itself under ``python -m torch.distributed.run`` with
``--worker`` and reads the result back from a file, so the line is printed after every rank exits.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwen3vl.launch.convert_commands import checkpoint_architecture, free_port, parallel_session
from qwen3vl.launch.verify_sample import build_verify_sample
from qwen3vl.model.build import build_model_chunks
from qwen3vl.model.interop.dist_reader import DistCheckpointReader
from qwen3vl.model.interop.hf_checkpoint import CheckpointMismatchError, open_hf_checkpoint, read_config
from qwen3vl.model.interop.hf_config import config_from_hf
from qwen3vl.model.interop.hf_weights import qwen3vl_mappings
from qwen3vl.model.interop.mapped_tensors import MappedTensors
from qwen3vl.model.interop.mcore_checkpoint import DTYPES, architecture_differences
from qwen3vl.parallel.context_parallel import gathered_key_order, model_inputs
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.parallel.schedules import forward_backward_func
from qwen3vl.train.checkpoint import load_weights, resolve_checkpoint


def world_size_for(layout: ParallelLayout) -> int:
    """The fewest ranks that hold the layout: tp·pp·cp for the dense part, and enough data-parallel
    replicas that ep·etp·pp divides the world as well (megatron carves EP out of DP·CP·TP)."""
    dense = layout.tp * layout.pp * layout.cp
    experts = layout.expert_tp * layout.ep * layout.pp
    return dense * experts // math.gcd(dense, experts)


# ---------------------------------------------------------------------------------------------
# Config agreement


def check_same_architecture(ckpt_config, hf_dir: str) -> None:
    differences = [f"{field}: checkpoint {a!r}, HF config.json {b!r}" for field, a, b in
                   architecture_differences(ckpt_config, config_from_hf(read_config(hf_dir)))]
    if differences:
        raise CheckpointMismatchError(
            f"the checkpoint and {hf_dir} describe different models:\n  " + "\n  ".join(differences)
            + "\nconvert the HF directory again (qwen3vl-convert hf-to-mcore) or pass the matching pair")


def weight_differences(hf_dir: str, checkpoint: Path, config) -> tuple[float, str, int]:
    """(largest |checkpoint - HF| over all weights, the HF weight where it is ("" when all are equal),
    weights compared), one mapping at a time."""
    hf = open_hf_checkpoint(hf_dir)
    ours = MappedTensors(qwen3vl_mappings(config), DistCheckpointReader(checkpoint).read, config, direction="theirs")
    worst, where, count = 0.0, "", 0
    for group in ours.groups:
        for name, tensor in zip(group, ours.make(group)):
            diff = float((tensor.double() - hf.read(name).double()).abs().max()) if tensor.numel() else 0.0
            if diff > worst:
                worst, where = diff, name
            count += 1
    return worst, where, count


# ---------------------------------------------------------------------------------------------
# Our side, on every rank


def _forward_logits(model: torch.nn.Module, inputs, layout: ParallelLayout) -> Optional[torch.Tensor]:
    """One forward through megatron's schedule (any PP); this rank's [T_local, V/TP] logits on the last
    pipeline stage, None elsewhere."""
    model_kwargs = inputs.model_kwargs(with_labels=False)

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        return chunk(**model_kwargs), None  # no loss function: the schedule keeps the output as is

    with torch.no_grad():
        outputs = forward_backward_func(layout)(
            forward_step_func=forward_step, data_iterator=iter([inputs]), model=[model], num_microbatches=1,
            seq_length=inputs.schedule_seq_length, micro_batch_size=1, forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]


def _gather_logits(local: torch.Tensor, cu_seqlens_padded: torch.Tensor) -> torch.Tensor:
    """[T_local, V/TP] on each TP/CP rank -> [T, V] in row order."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    full_vocab = torch.cat(parts, dim=-1)
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return full_vocab
    cp_group = parallel_state.get_context_parallel_group()
    rows = [torch.empty_like(full_vocab) for _ in range(cp)]
    dist.all_gather(rows, full_vocab, group=cp_group)
    return torch.cat(rows)[gathered_key_order(cu_seqlens_padded, cp)]


def _is_reporting_rank() -> bool:
    """Exactly one rank: last pipeline stage, first TP/CP/DP rank."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0)


def hf_logits(hf_dir: str, sample, dtype: torch.dtype) -> torch.Tensor:
    """transformers' logits [L, V] for the sample."""
    from transformers import AutoModelForImageTextToText  # lazy: transformers is optional (the convert extra)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    inputs = {k: v.to(device) for k, v in sample.hf_inputs().items()}
    with torch.no_grad():
        return model(**inputs).logits[0].float().cpu()


def verify_worker(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1,
                  pipeline_layers: Optional[Sequence[int]] = None, dtype: str = "float32",
                  sequence_parallel: bool = False) -> float:
    """Run on every rank of a job of ``world_size_for(layout)`` ranks (torchrun or the test harness).
    Returns the max |ours - transformers| over the sample's logits, the same value on every rank."""
    layout = ParallelLayout(tp=tp, pp=pp, ep=ep, cp=cp, sequence_parallel=sequence_parallel,
                            pipeline_layers=pipeline_layers)
    path = resolve_checkpoint(ckpt)
    config = checkpoint_architecture(path).model
    check_same_architecture(config, hf_dir)
    compute_dtype = DTYPES[dtype]
    sample = build_verify_sample(config)
    batch = sample.packed_batch(config, pad_multiple=layout.sequence_multiple)
    with parallel_session(layout) as world_size:
        layout.validate(world_size, seq_length=batch.seq_length, **config.layout_dims())
        # transformers' logits first, its model freed before ours is built (one rank reports).
        reference = hf_logits(hf_dir, sample, compute_dtype) if _is_reporting_rank() else None
        # One chunk: verify runs without virtual pipeline stages.
        [model] = build_model_chunks(config, compute_dtype, pipeline_layers, sequence_parallel=sequence_parallel)
        load_weights(path, [model])
        model.eval()
        inputs = model_inputs(batch, parallel_state.get_context_parallel_rank(), cp)
        local = _forward_logits(model, inputs, layout)
        result = torch.zeros((), dtype=torch.float64)
        if local is not None:
            ours = _gather_logits(local.float(), batch.cu_seqlens_padded)[: sample.length]
            if reference is not None:
                result.fill_(float((ours - reference).abs().max()))
        dist.all_reduce(result, op=dist.ReduceOp.MAX)  # the one reporting rank's value to everyone
    return float(result)


# ---------------------------------------------------------------------------------------------
# The command


def verify_command(args: argparse.Namespace) -> None:
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, cp=args.cp)
    world_size = world_size_for(layout)
    if not args.worker:
        path = resolve_checkpoint(args.ckpt)
        config = checkpoint_architecture(path).model
        check_same_architecture(config, args.hf)
        worst, where, count = weight_differences(args.hf, path, config)
        print(f"weights: max_abs_diff={worst:.6e} over {count} tensors" + (f" (largest at {where})" if where else ""),
              flush=True)
    if args.worker or world_size == 1:
        diff = verify_worker(args.hf, args.ckpt, args.tp, args.pp, args.ep, args.cp, args.pipeline_layers,
                             args.dtype, args.sequence_parallel)
        if int(os.environ.get("RANK", "0")) == 0:
            if args.result_file:
                Path(args.result_file).write_text(f"{diff!r}\n")
            else:
                print(f"max_abs_diff={diff:.6e}")
        return
    with tempfile.TemporaryDirectory(prefix="qwen3vl-verify-") as tmp:
        result_file = Path(tmp) / "max_abs_diff"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
                   "--master_port", str(free_port()), "-m", "qwen3vl.launch.convert", "verify",
                   "--hf", args.hf, "--ckpt", args.ckpt, "--tp", str(args.tp), "--pp", str(args.pp),
                   "--ep", str(args.ep), "--cp", str(args.cp), "--dtype", args.dtype,
                   "--worker", "--result-file", str(result_file)]
        if args.sequence_parallel:
            command.append("--sequence-parallel")
        if args.pipeline_layers:
            command += ["--pipeline-layers", ",".join(map(str, args.pipeline_layers))]
        print(f"verify: {world_size} ranks (tp={args.tp} pp={args.pp} ep={args.ep} cp={args.cp})", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        done = subprocess.run(command, env=env)
        if done.returncode != 0 or not result_file.is_file():
            sys.exit(done.returncode or 1)
        diff = float(result_file.read_text())
    print(f"max_abs_diff={diff:.6e}")
