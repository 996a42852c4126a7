"""megatron-core's pipeline schedules for a ``ParallelLayout``.

No pipeline -> ``forward_backward_no_pipelining``; pp > 1 -> 1F1B
(``forward_backward_pipelining_without_interleaving``); pp > 1 with vpp -> the interleaved 1F1B.
On CPU they run through the CPU backend: the int32 ``total_num_tokens`` accumulator megatron allocates
on "cuda" lands on the CPU and the stage-to-stage sends are gloo isend/irecv.
"""
from __future__ import annotations

from typing import Callable

from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

from qwen3vl.parallel import cpu_backend
from qwen3vl.parallel.layout import ParallelLayout


def forward_backward_func(layout: ParallelLayout) -> Callable:
    """The schedule for ``layout``; call it with megatron's keyword arguments (forward_step_func, ...)."""
    cpu_backend.enable()  # no-op with a GPU; the schedules allocate on "cuda" otherwise
    return get_forward_backward_func(pp_size=layout.pp, vp_size=layout.vpp)
