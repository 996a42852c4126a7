"""What this process's torch and transformer-engine can run, probed by the symbols the project calls.

A package that imports is not necessarily a package whose API we can call: ``varlen_attn`` gained ``scale``
and ``window_size`` in torch 2.10 and ``enable_gqa`` only in 2.12, and ``import transformer_engine``
succeeds in CUDA-less installs whose ``transformer_engine.pytorch`` does not. Each probe therefore checks
the exact keywords or classes the kernels use and says, in ``reason``, why a kernel is unusable, so that
``resolve_kernel`` can fall back (``auto``) or refuse with that reason (a kernel asked for by name).

Probes are cached per process: the answer cannot change while it runs.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch

# The keywords ``varlen_packed`` always passes; ``enable_gqa`` is passed only where it exists (torch >= 2.12).
VARLEN_KEYWORDS = ("scale", "window_size")
# Flash attention (the varlen kernel) needs an Ampere or newer GPU.
FLASH_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class KernelSupport:
    """One probe's answer: ``reason`` says why not (empty when usable). ``gqa_keyword``: varlen_attn takes
    ``enable_gqa`` (torch >= 2.12); without it flash takes fewer K/V heads than query heads natively."""

    usable: bool
    reason: str = ""
    gqa_keyword: bool = False


@functools.lru_cache(maxsize=None)
def varlen_signature_support() -> KernelSupport:
    """Whether ``torch.nn.attention.varlen.varlen_attn`` exists with the keywords ``varlen_packed`` passes."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # lazy: torch < 2.9 lacks it (this probe says so)
    except ImportError as err:
        return KernelSupport(False, f"torch {torch.__version__} has no torch.nn.attention.varlen ({err})")
    names = tuple(inspect.signature(varlen_attn).parameters)
    missing = [k for k in VARLEN_KEYWORDS if k not in names]
    if missing:
        return KernelSupport(False, f"torch {torch.__version__}'s varlen_attn has no {', '.join(missing)} keyword "
                                    "(torch >= 2.10 has them)")
    return KernelSupport(True, gqa_keyword="enable_gqa" in names)


@functools.lru_cache(maxsize=None)
def _flash_device_support(index: int) -> KernelSupport:
    if not torch.backends.cuda.is_flash_attention_available():
        return KernelSupport(False, "this torch build has no flash attention")
    capability = torch.cuda.get_device_capability(index)
    if capability < FLASH_MIN_CAPABILITY:
        return KernelSupport(False, f"GPU {index} has compute capability {capability}; flash attention needs "
                                    f"{FLASH_MIN_CAPABILITY} or newer")
    return KernelSupport(True)


def varlen_support(device: Optional[torch.device] = None) -> KernelSupport:
    """Whether the varlen kernel can run on ``device`` (default: the current CUDA device, if any)."""
    signature = varlen_signature_support()
    if not signature.usable:
        return signature
    if device is None:
        if not torch.cuda.is_available():
            return KernelSupport(False, "the varlen kernel needs CUDA and no GPU is visible")
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return KernelSupport(False, f"the varlen kernel runs on CUDA tensors, not {device.type}")
    flash = _flash_device_support(device.index if device.index is not None else torch.cuda.current_device())
    return flash if not flash.usable else signature


@functools.lru_cache(maxsize=None)
def transformer_engine_support() -> KernelSupport:
    """Whether megatron's ``TEDotProductAttention`` can be built: ``transformer_engine.pytorch`` imports with
    its ``DotProductAttention``, and megatron's TE extension found what it needs (its ``HAVE_TE``)."""
    try:
        import transformer_engine.pytorch as te_pytorch  # lazy: optional, GPU only (the gpu extra)
    except Exception as err:  # ImportError, or a CUDA library failing to load inside the import
        return KernelSupport(False, f"transformer_engine.pytorch does not import ({type(err).__name__}: {err}); "
                                    "install the 'gpu' extra or use a container that ships transformer-engine")
    if not hasattr(te_pytorch, "DotProductAttention"):
        return KernelSupport(False, "transformer_engine.pytorch has no DotProductAttention")
    from megatron.core.extensions import transformer_engine as megatron_te  # lazy: it imports transformer_engine

    if not getattr(megatron_te, "HAVE_TE", False):
        return KernelSupport(False, "megatron.core.extensions.transformer_engine could not import what it needs "
                                    "from transformer_engine (FP8GlobalStateManager, fp8_autocast)")
    return KernelSupport(True)
