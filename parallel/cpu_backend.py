"""Runs megatron-core on a machine without a GPU: CPU tensors, gloo collectives.

megatron-core assumes CUDA throughout (``torch.cuda.current_device()`` allocations, ``device="cuda"``
literals, CUDA RNG states, streams, ``'torch.cuda.FloatTensor'`` type checks; see
docs/parallel.md). ``enable()`` makes those call sites work on CPU without touching anything else:

* Every ``megatron.*`` module sees, under its global names ``torch`` / ``torch.cuda`` /
  ``torch.distributed``, a *facade* that forwards to the real module except for the handful of
  entries listed in ``_cuda_overrides`` / ``_torch_overrides`` / ``_distributed_overrides``.
  User code and PyTorch itself keep the real modules. Modules imported later are patched on import.
* Two ``torch.Tensor`` methods (``cuda`` and ``type``) change behaviour only when the caller is a
  ``megatron.*`` function; for any other caller they are the originals.

It is a strict no-op in a process that can see a GPU: a GPU run never executes any of this.

Usage::

    from qwen3vl.parallel import cpu_backend
    cpu_backend.enable()  # idempotent; returns True when the CPU backend is active
"""
from __future__ import annotations

import contextlib
import importlib.abc
import sys
import types
from typing import Any, Callable

import torch
import torch.distributed

_MEGATRON_PREFIX = "megatron."
_enabled = False
# Maps id(original object) -> replacement, applied to the globals of every megatron module.
_replacements: dict[int, Any] = {}


def is_enabled() -> bool:
    """True once ``enable()`` has switched this process to the CPU backend."""
    return _enabled


def device() -> torch.device:
    """The device megatron allocates on in this process: the current GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def enable() -> bool:
    """Switch megatron-core to CPU tensors and gloo. No-op (returns False) when CUDA is available."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    _build_replacements()
    _patch_tensor_methods()
    sys.meta_path.insert(0, _PatchMegatronOnImport())
    for name, module in list(sys.modules.items()):
        if name.startswith(_MEGATRON_PREFIX) and module is not None:
            _patch_module(module)
    _enabled = True
    return True


# --- what megatron sees as torch.cuda ------------------------------------------------------------
class _NoStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered, so every call is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> "_NoStream":
        return _NoStream()

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, *args: Any) -> float:
        return 0.0


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _cuda_overrides() -> dict[str, Any]:
    cpu = torch.device("cpu")
    return {
        "current_device": lambda: cpu,  # allocations "on the current GPU" land on the CPU
        "set_device": _noop,  # there is no device to select
        "synchronize": _noop,  # CPU ops are synchronous
        "empty_cache": _noop,  # no caching allocator on CPU
        "Stream": _NoStream,  # side streams (DDP overlap, MoE D2H copies) collapse to program order
        "Event": _NoStream,  # events used for ordering/timing become no-ops
        "stream": lambda *a, **k: contextlib.nullcontext(),  # `with torch.cuda.stream(s):` runs inline
        "current_stream": lambda *a, **k: _NoStream(),  # stream handles only used for waits
        "default_stream": lambda *a, **k: _NoStream(),  # idem
        "memory_allocated": _zero,  # memory statistics report 0 on CPU
        "max_memory_allocated": _zero,  # idem
        "memory_reserved": _zero,  # idem
        "max_memory_reserved": _zero,  # idem
        "reset_peak_memory_stats": _noop,  # idem
        "memory_stats": lambda *a, **k: {},  # idem
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),  # the RNG tracker forks the CPU generator
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),  # idem
        "manual_seed": lambda seed: torch.manual_seed(seed),  # model_parallel_cuda_manual_seed seeds the CPU
        "manual_seed_all": lambda seed: torch.manual_seed(seed),  # idem
        "nvtx": types.SimpleNamespace(range_push=_noop, range_pop=_noop, mark=_noop),  # no profiler ranges
    }


# --- what megatron sees as torch --------------------------------------------------------------
def _on_cpu_if_cuda(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wraps a tensor factory so that megatron's ``device="cuda"`` literals allocate on the CPU."""

    def factory_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        requested = kwargs.get("device")
        if requested is not None and torch.device(requested).type == "cuda":
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)  # pinning needs CUDA and is pointless for CPU tensors
        return factory(*args, **kwargs)

    factory_on_cpu.__name__ = factory.__name__
    return factory_on_cpu


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like")


def _torch_overrides() -> dict[str, Any]:
    # total_num_tokens in the schedules, found_inf/_scale_one in the optimizer, grad-norm buffers.
    return {name: _on_cpu_if_cuda(getattr(torch, name)) for name in _FACTORIES}


# --- what megatron sees as torch.distributed ------------------------------------------------------
def _as_list(sizes: Any) -> Any:
    return sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes


def _all_to_all_single_with_list_splits(output, input, output_split_sizes=None, input_split_sizes=None,
                                         *args: Any, **kwargs: Any):
    """gloo's all_to_all_single wants split sizes as Python lists; MoE dispatch passes tensors."""
    return torch.distributed.all_to_all_single(
        output, input, _as_list(output_split_sizes), _as_list(input_split_sizes), *args, **kwargs
    )


class _CompletedWork:
    """What an ``async_op=True`` collective returns once it has already run (gloo calls below are blocking)."""

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _all_gather_uneven(tensor_list, tensor, group=None, async_op: bool = False):
    """gloo's all_gather wants every block the same size; MoE dispatch under expert tensor parallelism
    gathers each rank's routed tokens, whose counts differ (NCCL takes uneven blocks). Unequal first
    dimensions are padded to the largest, gathered, and copied back unpadded: the same result."""
    if all(t.shape == tensor.shape for t in tensor_list):
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    rows = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in tensor_list]
    torch.distributed.all_gather(parts, padded, group=group)
    for out, part in zip(tensor_list, parts):
        out.copy_(part[:out.shape[0]])
    return _CompletedWork() if async_op else None


def _reduce_scatter_uneven(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None,
                           async_op: bool = False):
    """The backward of the gather above: gloo has no reduce_scatter for blocks of unequal size, so the
    blocks are all-reduced together and this rank keeps its own (for two ranks a sum in either order is
    the same float)."""
    if all(t.shape == output.shape for t in input_list):
        return torch.distributed.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
    full = torch.cat([t.contiguous() for t in input_list])  # blocks differ in their first dimension only
    torch.distributed.all_reduce(full, op=op, group=group)
    rank = torch.distributed.get_rank(group)
    start = sum(t.shape[0] for t in input_list[:rank])
    output.copy_(full[start:start + output.shape[0]])
    return _CompletedWork() if async_op else None


def _distributed_overrides() -> dict[str, Any]:
    return {"all_to_all_single": _all_to_all_single_with_list_splits, "all_gather": _all_gather_uneven,
            "reduce_scatter": _reduce_scatter_uneven}


# --- megatron.core.tensor_parallel.random ------------------------------------------------------------
def _get_cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces megatron's _get_cuda_rng_state: the CPU generator's state (already a copy)."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Replaces megatron's _set_cuda_rng_state: restores the CPU generator's state."""
    torch.set_rng_state(new_state)


# --- assembling the facades -------------------------------------------------------------------------
def _facade(real: types.ModuleType, overrides: dict[str, Any]) -> types.ModuleType:
    """A module that behaves as ``real`` except for ``overrides``; unknown names fall through to it."""
    facade = types.ModuleType(real.__name__, real.__doc__)
    facade.__dict__.update(real.__dict__)
    facade.__dict__.update(overrides)
    facade.__dict__["__getattr__"] = lambda name: getattr(real, name)  # lazily loaded submodules
    return facade


def _build_replacements() -> None:
    from megatron.core.tensor_parallel import random as megatron_random  # lazy: keeps the launcher free of megatron

    cuda = _facade(torch.cuda, _cuda_overrides())
    distributed = _facade(torch.distributed, _distributed_overrides())
    facade_torch = _facade(torch, {**_torch_overrides(), "cuda": cuda, "distributed": distributed})
    _replacements.update({
        id(torch): facade_torch,
        id(torch.cuda): cuda,
        id(torch.distributed): distributed,
        id(megatron_random._get_cuda_rng_state): _get_cpu_rng_state,
        id(megatron_random._set_cuda_rng_state): _set_cpu_rng_state,
    })


def _ordered_p2p_ops(p2p_ops: Callable[..., dict]) -> Callable[..., list]:
    """Pipeline sends/receives posted one by one in megatron's even/odd rank order.

    gloo matches the point-to-point messages between two ranks in posting order; a batched exchange
    that sends activations and gradients to the same peer (interleaved 1F1B on pp=2) would pair
    an activation with a gradient buffer. Megatron's unbatched path orders them so they pair up.
    """

    def batched_p2p_ops(**kwargs: Any) -> list:
        return list(p2p_ops(**kwargs).values())

    return batched_p2p_ops


def _patch_module_attributes(module: types.ModuleType) -> None:
    namespace = vars(module)
    if module.__name__ == "megatron.core.pipeline_parallel.p2p_communication":
        namespace["_batched_p2p_ops"] = _ordered_p2p_ops(namespace["_p2p_ops"])  # see _ordered_p2p_ops


def _patch_module(module: types.ModuleType) -> None:
    namespace = vars(module)
    for name, value in list(namespace.items()):
        replacement = _replacements.get(id(value))
        if replacement is not None:
            namespace[name] = replacement
    _patch_module_attributes(module)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then points the new megatron module at the facades."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: D401 - loader protocol
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        _patch_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... for inspect/linecache
        return getattr(self._loader, name)


class _PatchMegatronOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_MEGATRON_PREFIX):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


# --- torch.Tensor methods, only for megatron callers -----------------------------------------------
def _called_from_megatron() -> bool:
    caller = sys._getframe(2)  # 0: this helper, 1: the patched method, 2: its caller
    return caller.f_globals.get("__name__", "").startswith(_MEGATRON_PREFIX)


def _patch_tensor_methods() -> None:
    original_cuda = torch.Tensor.cuda
    original_type = torch.Tensor.type

    def cuda(self, *args: Any, **kwargs: Any):
        if _called_from_megatron():
            return self  # megatron moves a tensor "to the GPU": it stays on the CPU
        return original_cuda(self, *args, **kwargs)

    def type(self, *args: Any, **kwargs: Any):
        if not args and not kwargs and not self.is_cuda and _called_from_megatron():
            # DistributedOptimizer/clip_grads accept only 'torch.cuda.*Tensor' names: report CPU tensors so.
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, *args, **kwargs)

    torch.Tensor.cuda = cuda
    torch.Tensor.type = type
