"""The data loader the trainer uses: datasets -> packed rows, with an exact, small state.

    loader = build_loader(cfg, seq_length=8192, pad_multiple=2, dp_rank=r, dp_size=d, num_workers=0, seed=s)
    batch = next(loader)                        # a PackedBatch
    state = loader.state_dict()                 # small: positions, RNG states, counters
    loader = build_loader(...same...); loader.load_state_dict(state)   # continues bit-exactly

Each consumer (a rank × worker) runs a ``PackedStream`` (qwen3vl/data/packed_stream.py: streams ->
mixture -> encoder -> packer); its state is positions, RNG states, counters and the packer's buffer
by provenance (re-read and re-encoded on restore), a few kB, never pixels.

Worker processes (``num_workers > 0``): each worker runs its own ``PackedStream`` as consumer
``dp_rank * num_workers + w`` and sends every batch together with its state after that batch; the
loader takes batches round-robin. Its state is the round-robin position plus each worker's last
received state, so batches prefetched but not yet consumed are simply produced again after restore.

Changing the layout on resume (a different ``dp_size`` or ``num_workers``) changes which shards each
consumer reads, so positions cannot carry over: ``load_state_dict`` refuses with a message, and
``load_state_dict(state, allow_layout_change=True)`` restarts every dataset at the beginning of the
epoch it had reached (samples of that epoch may be seen twice, none is left out; skip counters and
the mixture's draws start afresh).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from qwen3vl.data.batch import PackedBatch
from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.loader_workers import END, ERROR, WorkerPool
from qwen3vl.data.packed_stream import PackedStream
from qwen3vl.data.processing_config import ProcessingConfig
from qwen3vl.data.shards import check_shards_exist, expand_shards
from qwen3vl.data.stream import Consumer
from qwen3vl.data.tokenizer import load_tokenizer

STATE_VERSION = 1


@dataclass
class DatasetSpec:
    path: str  # shard pattern (brace/``::``), directory, or pipe:/http URL
    weight: float = 1.0


@dataclass
class LoaderConfig:
    datasets: list[DatasetSpec]
    shuffle_buffer: int = 1000  # raw samples per shuffle block of each dataset stream (held in memory, undecoded)
    shuffle_shards: bool = True
    pack_buffer: int = 256  # encoded samples the packer may hold to fill rows well
    max_patches_per_row: int | None = None  # ViT patch budget of one row (None: the packer's default)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    tokenizer_path: str | None = None  # None: the bundled Qwen vocabulary
    max_consecutive_failures: int = 100
    num_epochs: int | None = None  # None: every dataset cycles forever (reshuffled each epoch)
    prefetch: int = 4  # batches each worker process may run ahead

    def __post_init__(self):
        # (path, weight) pairs, {"path", "weight"} mappings (Hydra/OmegaConf configs) or DatasetSpecs
        self.datasets = [d if isinstance(d, DatasetSpec) else
                         DatasetSpec(**d) if isinstance(d, Mapping) else DatasetSpec(*d) for d in self.datasets]
        if not self.datasets:
            raise ValueError("LoaderConfig.datasets is empty: give at least one (path, weight)")


class Loader:
    """Iterator of ``PackedBatch`` for one data-parallel rank. See the module docstring."""

    def __init__(self, cfg: LoaderConfig, *, seq_length: int, pad_multiple: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, seed: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size={dp_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.cfg, self.seq_length, self.pad_multiple, self.seed = cfg, seq_length, pad_multiple, seed
        self.layout = {"dp_rank": dp_rank, "dp_size": dp_size, "num_workers": num_workers}
        self.urls = [expand_shards(d.path) for d in cfg.datasets]
        for urls in self.urls:
            check_shards_exist(urls)
        # One encoder (tokenizer loaded once); forked workers inherit it.
        self.encoder = SampleEncoder(load_tokenizer(cfg.tokenizer_path), replace(cfg.processing, seq_length=seq_length))
        per_rank = max(1, num_workers)
        self.consumers = [Consumer(dp_rank * per_rank + w, dp_size * per_rank) for w in range(per_rank)]
        self._worker_states: list[dict | None] = [None] * per_rank
        self._done = [False] * per_rank
        self._next_worker = 0
        self._pool: WorkerPool | None = None
        self._local = self._new_stream(self.consumers[0]) if num_workers == 0 else None

    @property
    def stream(self) -> PackedStream | None:
        """The in-process pipeline (``num_workers=0``), e.g. for throughput counters; else None."""
        return self._local

    def _new_stream(self, consumer: Consumer) -> PackedStream:
        return PackedStream(self.cfg, self.urls, seq_length=self.seq_length, pad_multiple=self.pad_multiple,
                            consumer=consumer, seed=self.seed, encoder=self.encoder)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> PackedBatch:
        if self._local is not None:
            return next(self._local)
        if self._pool is None:
            self._pool = WorkerPool(self.cfg, self.urls, self.seq_length, self.pad_multiple, self.consumers,
                                     self.seed, self.encoder, self._worker_states)
        while not all(self._done):
            worker = self._next_worker
            if self._done[worker]:
                self._next_worker = (worker + 1) % len(self._done)
                continue
            batch, state = self._pool.get(worker)
            if isinstance(batch, str) and batch == ERROR:
                self.close()
                raise RuntimeError(state)
            if isinstance(batch, str) and batch == END:
                self._done[worker], self._worker_states[worker] = True, state
                continue
            self._worker_states[worker] = state
            self._next_worker = (worker + 1) % len(self._done)
            return batch
        raise StopIteration

    def skipped_counts(self) -> dict[str, int]:
        """Skipped samples by reason on this rank (all its workers, as of the batches consumed)."""
        if self._local is not None:
            return self._local.skipped_counts()
        total: dict[str, int] = {}
        for state in self._worker_states:
            for reason, n in (state["skips"]["counts"] if state else {}).items():
                total[reason] = total.get(reason, 0) + n
        return dict(sorted(total.items()))

    def state_dict(self) -> dict:
        workers = [self._local.state_dict()] if self._local is not None else list(self._worker_states)
        return {"version": STATE_VERSION, "layout": dict(self.layout), "next_worker": self._next_worker,
                "done": list(self._done), "workers": workers}

    def load_state_dict(self, state: dict, *, allow_layout_change: bool = False) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if self._pool is not None:
            raise RuntimeError("load_state_dict must be called before the first batch is drawn")
        saved = {k: state["layout"][k] for k in ("dp_size", "num_workers")}
        current = {k: self.layout[k] for k in ("dp_size", "num_workers")}
        if saved != current:
            if not allow_layout_change:
                raise ValueError(
                    f"the data loader state was saved with {saved} but this run has {current}: each "
                    "(rank, worker) reads other shards now, so the exact position cannot carry over. Resume with "
                    "the same data-parallel size and num_workers, or pass allow_layout_change=True to restart "
                    "each dataset at the beginning of the epoch it had reached")
            self._restart_epochs(state)
            return
        self._next_worker, self._done = int(state["next_worker"]), list(state["done"])
        if self._local is not None:
            self._local.load_state_dict(state["workers"][0])
        else:
            self._worker_states = list(state["workers"])

    def _restart_epochs(self, state: dict) -> None:
        known = [w for w in state["workers"] if w is not None]
        epochs = [min((w["streams"][i]["epoch"] for w in known), default=0) for i in range(len(self.urls))]
        if self._local is not None:
            self._local.load_state_dict({"restart_epochs": epochs})
        else:
            self._worker_states = [{"restart_epochs": epochs} for _ in self.consumers]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        self.close()


def build_loader(cfg: LoaderConfig, seq_length: int, pad_multiple: int = 1, dp_rank: int = 0, dp_size: int = 1,
                 num_workers: int = 0, seed: int = 0) -> Loader:
    """The trainer's entry point; see ``Loader`` and the module docstring."""
    return Loader(cfg, seq_length=seq_length, pad_multiple=pad_multiple, dp_rank=dp_rank, dp_size=dp_size,
                  num_workers=num_workers, seed=seed)
