"""Save time and peak host memory per rank of a training checkpoint: this project's optimizer format
(qwen3vl.train.optimizer_shards: every rank writes its ZeRO-1 range in place) against megatron's
``fully_reshardable`` save (each DP group's optimizer state all-gathered to every rank), side by side in
one run, on CPU ranks (gloo), plus the asynchronous save.

    torchrun --nproc-per-node 2 benchmarks/checkpoint_bench.py --out /tmp/ckpt_bench

The model has the 2B's widths (LLM hidden 2048, FFN 6144, 16 heads / 8 KV heads of 128; ViT 1024 wide) with
fewer layers and a smaller vocabulary (options), so that the old format's gather fits a small machine.
Each save starts from the same trained state (one AdamW step on random gradients, so no page of the
optimizer state is an untouched zero page). Peak memory is the process's resident high-water mark
(VmHWM, reset through /proc/self/clear_refs before each save) minus its resident size before the save;
the saves run new format first, then async, then megatron's, with the freed heap returned to the system
(malloc_trim) in between. Rank 0 prints a table and, last, one JSON line. Not a test: timings depend on
the machine (results and machine go in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _settle() -> int:
    """Frees what can be freed, resets the resident high-water mark; returns the resident size (bytes)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status_kib("VmRSS") * 1024


def _measure(save) -> dict:
    dist.barrier()
    before = _settle()
    started = time.perf_counter()
    returned = save()
    dist.barrier()
    done = time.perf_counter()
    return {"seconds": done - started, "returned_after_s": returned - started if returned else done - started,
            "rss_before": before, "peak_extra": _status_kib("VmHWM") * 1024 - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="scratch directory for the checkpoints (removed after)")
    parser.add_argument("--llm-layers", type=int, default=1)
    parser.add_argument("--vit-depth", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--train-vision", action="store_true",
                        help="also train the ViT and the mergers (default: frozen, as in no optimizer state)")
    args = parser.parse_args()

    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import OptimizerConfig

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.presets import get_preset
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.parallel.zero1 import wrap_for_training
    from qwen3vl.train import checkpoint as ckpt
    from qwen3vl.train.checkpoint_async import AsyncSaver
    from qwen3vl.train.freeze import apply_freeze

    torch.set_num_threads(1)
    layout = ParallelLayout()
    initialize_parallel(layout)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = get_preset("2B")
    config.text.num_layers, config.text.vocab_size = args.llm_layers, args.vocab
    config.vision.depth, config.vision.deepstack_visual_indexes = args.vit_depth, ()
    config.image_token_id, config.video_token_id = args.vocab - 2, args.vocab - 1
    config.vision_start_token_id, config.vision_end_token_id = args.vocab - 4, args.vocab - 3
    chunks = build_model_chunks(config)
    apply_freeze(chunks, "all" if args.train_vision else ["llm"])
    chunks, optimizer = wrap_for_training(chunks, layout, OptimizerConfig(optimizer="adam", lr=1e-4, bf16=False))
    generator = torch.Generator().manual_seed(rank)
    for chunk in chunks:
        for p in chunk.parameters():
            if p.requires_grad:
                p.main_grad.copy_(torch.randn(p.shape, generator=generator))
    optimizer.step()
    trained = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    total = sum(p.numel() for c in chunks for p in c.parameters())

    out = Path(args.out)
    results = {}
    results["ours"] = _measure(lambda: ckpt.save_checkpoint(out / "ours", ckpt.TrainState(step=1), chunks, optimizer)
                               and None)
    saver = AsyncSaver()

    def save_async():
        ckpt.save_checkpoint(out / "async", ckpt.TrainState(step=1), chunks, optimizer, async_saver=saver)
        returned = time.perf_counter()
        saver.wait()
        return returned

    results["ours_async"] = _measure(save_async)

    def save_megatron():
        target = out / "megatron"
        if rank == 0:
            target.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        model_sd = ckpt._model_sharded_state_dict(chunks)
        sd = {**model_sd, "optimizer": optimizer.sharded_state_dict(
            dict(model_sd), metadata={"distrib_optim_sharding_type": "fully_reshardable"})}
        dist_checkpointing.save(sd, str(target))

    results["megatron_fully_reshardable"] = _measure(save_megatron)
    saver.close()

    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        print(f"model: 2B widths, {args.llm_layers} LLM layer(s), ViT depth {args.vit_depth}, vocab {args.vocab}; "
              f"{total / 1e6:.1f}M parameters, {trained / 1e6:.1f}M trained (optimizer state "
              f"{trained * 12 / 2**30:.2f} GiB in all, {trained * 12 / world / 2**30:.2f} GiB per rank)")
        print(f"{'format':<28}{'rank':>5}{'save s':>9}{'returns s':>11}{'RSS before GiB':>16}{'peak extra GiB':>16}")
        for name in results:
            for r, per_rank in enumerate(gathered):
                m = per_rank[name]
                print(f"{name:<28}{r:>5}{m['seconds']:>9.2f}{m['returned_after_s']:>11.2f}"
                      f"{m['rss_before'] / 2**30:>16.2f}{m['peak_extra'] / 2**30:>16.2f}")
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({"parameters": total, "trained_parameters": trained, "world_size": world,
                          "per_rank": gathered}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
