"""Run a function on N gloo ranks in persistent worker processes (multi-process tests without a GPU).

    from qwen3vl_testing.distributed import run_distributed

    def body(scale):                      # module level: workers import it from its source file
        import torch.distributed as dist
        return dist.get_rank() * scale

    assert run_distributed(body, world_size=2, scale=10) == [0, 10]

Each world size gets one pool of worker processes (``python -m qwen3vl_testing.distributed``), started on
first use and reused by later calls, because starting a process and importing megatron costs seconds.
In a worker torch.distributed is initialised once (gloo, world group) and the CPU backend is on; CUDA is
hidden from CPU workers, so the suite stays on the CPU on a machine with a GPU. GPU tests ask for
``device="cuda"``: a separate pool whose ranks see the GPU (rank r on GPU r) and join with NCCL.
Every call runs ``fn(**kwargs)`` on all ranks with ``torch.manual_seed(0)``, then resets megatron's
global state (process groups, RNG tracker, micro-batch calculator, ...) so calls do not leak into
each other. Failures are collected from every rank, with tracebacks, into one ``DistributedTestError``.
A call never hangs: past ``timeout`` (or when a worker dies, or when the other ranks do not finish
shortly after one failed, typically because they wait in a collective for it) the pool is killed,
the error shows what each rank printed last, and the next call starts a fresh pool.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_TIMEOUT_S = 120.0
# After one rank fails, how long the others get to finish before the pool is declared stuck.
FAILURE_GRACE_S = 5.0
STARTUP_TIMEOUT_S = 600.0  # generous: a busy CI machine can take minutes to import torch + megatron
_OUTPUT_TAIL_LINES = 30
DEVICES = ("cpu", "cuda")


class DistributedTestError(AssertionError):
    """One or more ranks failed, timed out or died; the message holds every rank's report."""


def run_distributed(fn: Callable[..., Any], world_size: int, timeout: float = DEFAULT_TIMEOUT_S,
                    device: str = "cpu", **kwargs: Any) -> list[Any]:
    """Run the module-level function ``fn(**kwargs)`` on ``world_size`` ranks; return per-rank results.

    ``device``: "cpu" (gloo ranks, CUDA hidden, the CPU backend on) or "cuda" (NCCL ranks, one GPU each).
    ``kwargs`` and the return values must be picklable. Raises ``DistributedTestError`` naming every
    failing rank with its traceback, or, on timeout, with the tail of what each rank printed.
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    source = _function_source(fn)
    key = (world_size, device)
    pool = _pools.get(key)
    if pool is None or not pool.alive():
        pool = _pools[key] = _WorkerPool(world_size, device)
    try:
        return pool.call(source, kwargs, timeout)
    except DistributedTestError:
        if not pool.alive():
            _pools.pop(key, None)
        raise
    finally:
        _retire_pools_with_leaked_groups()


# The process groups of a training body outlive it (see _destroy_subgroups: its model, DDP and optimizer
# keep them referenced from C++), and every gloo group keeps network threads that wake up while idle:
# ~16 per 2-rank TP2 training body; 276 in a 4-rank pool after the layout matrix, a sixth of a core per
# process, idle or not, for every pool alive. A pool past this many is closed; the next call starts a new one.
MAX_NETWORK_THREADS = 96


def _network_threads(pid: int) -> int:
    try:
        return sum(Path(task, "comm").read_text().strip() == "gloo_tcp_loop"
                   for task in Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # not Linux, or gone
        return 0


def _retire_pools_with_leaked_groups() -> None:
    for key, pool in list(_pools.items()):
        if pool.alive() and _network_threads(pool.pid(0)) > MAX_NETWORK_THREADS:
            pool.close()
            _pools.pop(key, None)


def shutdown_pools() -> None:
    """Stop every worker pool (done automatically at interpreter exit)."""
    for pool in list(_pools.values()):
        pool.close()
    _pools.clear()


@dataclass(frozen=True)
class _FunctionSource:
    module: str
    path: str
    qualname: str


def _function_source(fn: Callable[..., Any]) -> _FunctionSource:
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"run_distributed needs a module-level function, got {qualname!r}: "
                         "move it to the top level of its file")
    module = sys.modules.get(fn.__module__)
    code = getattr(fn, "__code__", None)
    path = getattr(module, "__file__", None) or (code.co_filename if code else None)
    if path is None or not os.path.exists(path):
        raise ValueError(f"cannot find the source file of {fn.__module__}.{qualname}")
    return _FunctionSource(fn.__module__, os.path.abspath(path), qualname)


# --- parent side ------------------------------------------------------------------------------
def support_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python that imports this package: tests/support is not installed, and
    pytest's `pythonpath` setting reaches only the pytest process itself."""
    support = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (support, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **extra, "PYTHONPATH": path}


class _WorkerPool:
    def __init__(self, world_size: int, device: str = "cpu") -> None:
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix=f"qwen3vl-pool{world_size}{device}-")
        store = os.path.join(self._dir.name, "store")  # file rendezvous: no port to race for
        env = support_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not see a GPU (megatron would allocate there)
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._logs: list[Path] = []
        for rank in range(world_size):
            ours, theirs = _socket_pair()
            log = Path(self._dir.name, f"rank{rank}.log")
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "qwen3vl_testing.distributed", str(rank), str(world_size), store,
                     str(theirs.fileno()), device],
                    pass_fds=(theirs.fileno(),), stdout=out, stderr=subprocess.STDOUT, env=env,
                    stdin=subprocess.DEVNULL,
                    # Own process group: killing a stuck worker also kills what it started
                    # (dist_checkpointing's Manager and writer processes).
                    start_new_session=True)
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
            self._logs.append(log)
        self._offsets = [0] * world_size
        replies = self._collect(STARTUP_TIMEOUT_S, "starting the worker pool")
        if any(kind != "ready" for kind, _ in replies):
            error = self._fail(replies, "worker pool failed to start")
            self.close(graceful=False)
            raise error

    def pid(self, rank: int) -> int:
        return self._procs[rank].pid

    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def call(self, source: _FunctionSource, kwargs: dict, timeout: float) -> list[Any]:
        self._offsets = [log.stat().st_size for log in self._logs]
        request = pickle.dumps((source, kwargs))
        for conn in self._conns:
            conn.send_bytes(request)
        replies = self._collect(timeout, f"running {source.qualname}")
        if all(kind == "ok" for kind, _ in replies):
            return [value for _, value in replies]
        raise self._fail(replies, f"{source.qualname} failed on {self.world_size} ranks")

    def _collect(self, timeout: float, doing: str) -> list[tuple[str, Any]]:
        """One reply per rank; ("timeout"/"died", None) for ranks that gave none. Kills a stuck pool."""
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(self._conns))
        while pending:
            if any(kind == "error" for kind, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            remaining = deadline - time.monotonic()
            ready = wait(list(pending.values()), timeout=max(0.0, remaining)) if remaining > 0 else []
            if not ready:
                break
            for rank, conn in list(pending.items()):
                if conn in ready:
                    try:
                        replies[rank] = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        replies[rank] = ("died", f"worker exited (code {self._procs[rank].wait(5)})")
                    del pending[rank]
        if pending:
            for rank in pending:
                replies[rank] = ("timeout", f"no answer after {timeout:.0f} s while {doing}"
                                 if not any(k == "error" for k, _ in replies.values()) else
                                 "did not finish after another rank failed (waiting in a collective?)")
        if pending or any(kind == "died" for kind, _ in replies.values()):
            self.close(graceful=False)  # a stuck or half-dead pool cannot run the next call: respawn
        return [replies[rank] for rank in range(self.world_size)]

    def _fail(self, replies: list[tuple[str, Any]], headline: str) -> DistributedTestError:
        sections = []
        for rank, (kind, detail) in enumerate(replies):
            if kind in ("ok", "ready"):
                continue
            section = f"--- rank {rank}: {kind} ---\n{detail}"
            if kind != "error":
                section += f"\n--- rank {rank}: last output ---\n{self._output_tail(rank)}"
            sections.append(section)
        return DistributedTestError(headline + "\n" + "\n".join(sections))

    def _output_tail(self, rank: int) -> str:
        try:
            data = self._logs[rank].read_bytes()[self._offsets[rank]:]
        except OSError:
            return "(no output)"
        lines = data.decode(errors="replace").splitlines()[-_OUTPUT_TAIL_LINES:]
        return "\n".join(lines) or "(no output)"

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: idle ones exit on their own once their pipe closes, stuck ones are killed."""
        for conn in self._conns:
            conn.close()
        deadline = time.monotonic() + (5.0 if graceful else 0.0)
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and its children, if any are left
            except ProcessLookupError:
                pass
            proc.wait()
        self._procs, self._conns = [], []


def _socket_pair() -> tuple[Connection, Connection]:
    import socket

    a, b = socket.socketpair()
    return Connection(a.detach()), Connection(b.detach())


_pools: dict[tuple[int, str], _WorkerPool] = {}
atexit.register(shutdown_pools)


# --- worker side ------------------------------------------------------------------------------
_loaded_modules: dict[str, Any] = {}


def _load_function(source: _FunctionSource) -> Callable[..., Any]:
    module = _loaded_modules.get(source.path)
    if module is None:
        module = _import_by_name(source) or _import_by_path(source.path)
        _loaded_modules[source.path] = module
    target = module
    for part in source.qualname.split("."):
        target = getattr(target, part)
    return target


def _import_by_name(source: _FunctionSource) -> Optional[Any]:
    """The regular module if it is importable here and is the same file (package code, not tests)."""
    try:
        module = importlib.import_module(source.module)
    except Exception:  # noqa: BLE001 - test files are usually not importable by name
        return None
    same_file = os.path.abspath(getattr(module, "__file__", "") or "") == source.path
    return module if same_file else None


def _import_by_path(path: str) -> Any:
    name = "_distributed_test_" + str(abs(hash(path)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def _reset_megatron_state() -> None:
    """Undo the process-wide state a test body may leave in megatron-core."""
    from megatron.core import num_microbatches_calculator, parallel_state, rerun_state_machine
    from megatron.core.transformer.moe import moe_utils

    from qwen3vl.parallel.groups import destroy_parallel

    destroy_parallel()
    _destroy_subgroups()
    parallel_state.destroy_global_memory_buffer()
    num_microbatches_calculator.destroy_num_microbatches_calculator()
    rerun_state_machine.destroy_rerun_state_machine()
    moe_utils._MOE_LAYER_WISE_LOGGING_TRACKER.clear()


def _destroy_subgroups() -> None:
    """Destroy every process group but the world. megatron's ``destroy_model_parallel`` only forgets its
    groups; torch keeps them, and each gloo group keeps its own network-loop threads waking up, so a
    worker that ran a few hundred test bodies burnt a third of a core while idle."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    gc.collect()  # the body's model, DDP buckets and optimizer hold its groups, some of them in cycles
    world = dist.GroupMember.WORLD
    for group in list(distributed_c10d._world.pg_map):  # private, but torch has no public list of groups
        if group is not world:
            dist.destroy_process_group(group)


def _run_one(source: _FunctionSource, kwargs: dict) -> tuple[str, Any]:
    import torch

    try:
        fn = _load_function(source)
        torch.manual_seed(0)
        result = fn(**kwargs)
        pickle.dumps(result)  # fail here, with a clear message, rather than while replying
        return ("ok", result)
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        return ("error", traceback.format_exc())
    finally:
        try:
            _reset_megatron_state()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        torch.set_default_dtype(torch.float32)


def _worker_main(rank: int, world_size: int, store_path: str, fd: int, device: str) -> None:
    conn = Connection(fd)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store_path}",
                                rank=rank, world_size=world_size)
        if device == "cpu":
            from qwen3vl.parallel import cpu_backend

            if not cpu_backend.enable():
                raise RuntimeError("a CPU worker sees a GPU: CUDA_VISIBLE_DEVICES must stay empty for it")
        import megatron.core.parallel_state  # noqa: F401 - pay the import once, at pool start
        conn.send_bytes(pickle.dumps(("ready", rank)))
    except BaseException:  # noqa: BLE001
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        return
    while True:
        try:
            source, kwargs = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the parent closed the pool or exited
        print(f"[rank {rank}] running {source.qualname}", flush=True)
        conn.send_bytes(pickle.dumps(_run_one(source, kwargs)))


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
