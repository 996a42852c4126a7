"""Shared by the device check's pieces (benchmarks/gpu_check.sh runs each as a script from this folder).

Results are JSON lines in $GC_OUT/results.jsonl (small: they come back from the device); large CPU
reference files stay on the device, under $GC_REF. $GC_DEVICE is 'cuda', or 'cpu' for a dry run.
"""
from __future__ import annotations

import json
import os
import time
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
import torch  # noqa: E402

OUT = os.environ.get("GC_OUT", "/tmp/gc_out")
REF = os.environ.get("GC_REF", "/tmp/gc/ref")
DEVICE = torch.device(os.environ.get("GC_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
os.makedirs(OUT, exist_ok=True)
os.makedirs(REF, exist_ok=True)


def log(*parts) -> None:
    print("[gc]", *parts, flush=True)


def record(section: str, **values) -> None:
    """Append one JSON line to $GC_OUT/results.jsonl and echo it."""
    line = {"section": section, "t": round(time.time(), 1), **values}
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
    log(section, json.dumps(values, default=str)[:1500])


def error_text(err: BaseException, limit: int = 300) -> str:
    return f"{type(err).__name__}: {str(err)[:limit]}"


def patch_te_general_gemm() -> bool:
    """F2 (not fixed yet): megatron 0.16.1's MoE router reads ``te_general_gemm``, which moe_utils defines only
    when transformer_engine imports (NameError otherwise); the CPU backend defines it, a GPU run does not.
    True when it was missing (the workaround was needed)."""
    from megatron.core.transformer.moe import moe_utils

    if "te_general_gemm" in vars(moe_utils):
        return False
    moe_utils.te_general_gemm = None
    return True


def one_rank() -> None:
    """A one-rank job on this device (NCCL with a GPU, gloo without) with megatron's groups built."""
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
