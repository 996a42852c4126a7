"""A quiet console for the training processes: rank 0 shows the progress line, the others only errors.

Third-party warnings that are known and harmless are filtered by category, the module they arise in
and their message (``KNOWN_HARMLESS``, each with the reason it is harmless), never by a blanket
ignore; every other warning is shown once per process, however often it fires (several libraries
reset Python's per-location registry, so "default" would repeat a warning every step). A ``-W`` option
or ``PYTHONWARNINGS`` wins over the once-rule, so a user can still ask for every warning.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    category: type[Warning]
    module: str  # regex on the module the warning is attributed to
    message: str  # regex on the start of the message
    why: str  # why it is harmless here


KNOWN_HARMLESS = (
    KnownWarning(UserWarning, r"megatron\.core\.", r"(Transformer Engine and )?Apex (is|are) not installed",
                 "megatron-core's notes that it falls back to torch without apex / transformer-engine; apex is "
                 "not a dependency and transformer-engine is optional (README, Dependencies)"),
    KnownWarning(UserWarning, r"megatron\.core\.transformer\.transformer_config", r"full scope is deprecated",
                 "megatron-core 0.16.1's own default cuda_graph_scope='full'; CUDA graphs are not used"),
    KnownWarning(UserWarning, r"megatron\.core\.optimizer\.optimizer",
                 r"The \.grad attribute of a Tensor that is not a leaf",
                 "megatron's optimizer probes `.grad` on its fp32 main-parameter views; it reads, never relies "
                 "on it (gradients live in main_grad)"),
    KnownWarning(FutureWarning, r"torch\.distributed\.c10d_logger",
                 r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                 "megatron-core 0.16.1's DDP and ZeRO-1 call the collectives torch 2.13 renamed; same operation"),
    KnownWarning(FutureWarning, r"torch\.distributed\.checkpoint\.",
                 r"Please use DTensor instead and we are deprecating ShardedTensor",
                 "megatron-core's dist checkpointing hands torch.distributed.checkpoint ShardedTensors"),
    KnownWarning(FutureWarning, r"megatron\.core\.dist_checkpointing\.strategies\.torch",
                 r"`load_state_dict` is deprecated", "megatron-core 0.16.1 calls torch's renamed checkpoint load"),
)


def filter_known_warnings() -> None:
    """Ignore the known harmless third-party warnings; show every other warning once."""
    if not sys.warnoptions:
        # Appended: Python's default ignores (DeprecationWarning outside __main__, ...) still come first.
        warnings.simplefilter("once", append=True)
    for known in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)


def configure_console(rank: int) -> None:
    """Rank 0: the known warnings filtered, log records from WARNING up. Other ranks: errors only."""
    filter_known_warnings()
    if rank != 0:
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)


def write_whole(text: str, stream=None) -> None:
    """``text`` (a newline added if missing) in one ``write(2)`` on ``stream``'s descriptor (stderr by default).

    Every rank of a job writes to the one pipe torchrun or srun hands them; ``print`` writes a line and
    its newline separately, so two ranks failing at once could run their lines together. POSIX keeps a
    pipe write of up to PIPE_BUF (4,096) bytes in one piece, so a line, or a traceback under that size,
    reaches the console whole. A stream without a descriptor (pytest's capture) gets a plain write.
    """
    stream = sys.stderr if stream is None else stream
    if not text.endswith("\n"):
        text += "\n"
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        stream.write(text)
        stream.flush()
        return
    stream.flush()  # what Python still buffers goes first, in order
    data = text.encode(getattr(stream, "encoding", None) or "utf-8", errors="replace")
    while data:  # a pipe write can be partial only past PIPE_BUF or on a signal
        data = data[os.write(fd, data):]
