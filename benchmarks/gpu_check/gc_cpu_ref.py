"""P1: the fp32 reference on the project's CPU path (run with CUDA hidden: gloo and the CPU backend), saved
under $GC_REF for gc_parity.py: weights, logits of the tiny rows, per-token loss, gradients."""
import sys

import torch
from gc_common import REF, one_rank, record

from qwen3vl.parallel import cpu_backend
from qwen3vl.parallel.groups import destroy_parallel
from qwen3vl_testing.gpu import tiny_model_outputs

assert not torch.cuda.is_available(), "run with CUDA_VISIBLE_DEVICES= (the reference is the CPU path)"
for preset in sys.argv[1:] or ["tiny", "tiny-moe"]:
    one_rank()
    torch.manual_seed(0)
    result = tiny_model_outputs(preset, "float32")
    torch.save(result, f"{REF}/ref_{preset}.pt")
    record("cpu_reference", preset=preset, cpu_backend=cpu_backend.is_enabled(), rows=list(result["logits"]),
           grads=len(result["grads"]), loss_sum=float(result["loss"].sum()))
    destroy_parallel()
