"""The data loader the trainer uses: datasets -> packed rows, with an exact, small, elastic state.

    loader = build_loader(cfg, seq_length=8192, pad_multiple=2, dp_rank=r, dp_size=d, num_workers=2, seed=s)
    batch = next(loader)                        # a PackedBatch
    state = loader.state_dict()                 # this rank's: positions, RNG states, counters (a few kB)
    loader = build_loader(...); loader.load_state_dict([state of every DP rank])   # continues

Each consumer (a rank × worker) runs a ``PackedStream`` (qwen3vl/data/packed_stream.py: streams ->
mixture -> encoder -> packer); its state is positions, RNG states, counters and the packer's buffer
by provenance (re-read and re-encoded on restore), a few kB, never pixels.

Worker processes (``num_workers > 0``, see loader_workers.py): each worker runs its own
``PackedStream`` as consumer ``dp_rank * num_workers + w`` and sends every batch together with its
state after that batch; the loader takes batches round-robin. Its state is the round-robin position
plus each worker's last received state, so batches prefetched but not yet consumed are simply
produced again after restore.

Resume: ``load_state_dict`` takes every data-parallel rank's saved state (what the checkpoint holds).
Under the same data-parallel size and ``num_workers`` each consumer restores its own state and the
loader continues bit-exactly. Under another, the position of the whole run is re-partitioned over the
new consumers (qwen3vl/data/elastic.py): the epochs in progress continue where they were, every sample
of an epoch is trained on exactly once over the whole run, then the next epochs start as usual.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

import torch

from qwen3vl.data.batch import PackedBatch
from qwen3vl.data.dataset_errors import ON_EMPTY_DATASET
from qwen3vl.data.elastic import repartition
from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.loader_workers import END, ERROR, PinningReader, WorkerPool
from qwen3vl.data.packed_stream import PackedStream
from qwen3vl.data.pixel_memory import pinned_rows
from qwen3vl.data.processing_config import ProcessingConfig
from qwen3vl.data.shards import check_shards_exist, expand_shards
from qwen3vl.data.stream import Consumer
from qwen3vl.data.tokenizer import load_tokenizer

log = logging.getLogger("qwen3vl.data")
STATE_VERSION = 2


@dataclass
class DatasetSpec:
    path: str  # shard pattern (brace/``::``), directory, or pipe:/http URL
    weight: float = 1.0
    name: str | None = None  # how the data trace and messages name it (the config's data.datasets[i].name;
    # default: from the path)


def default_name(path: str) -> str:
    """``/data/laion/shard-{000..099}.tar`` -> ``laion``; ``/data/text`` -> ``text``."""
    first = path.split("::")[0].split()[-1]  # the first pattern; of a pipe: command, its last word
    parts = [p for p in PurePosixPath(re.sub(r"^\w+://", "", first)).parts if p not in ("/", "")]
    named = [p for p in parts if not re.search(r"[{}*?\[]", p) and not p.endswith(".tar")]
    return named[-1] if named else "data"


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
    on_empty_dataset: str = "stop"  # a dataset without a readable shard: "stop" the run or "drop" it
    pin_memory: bool | None = None  # rows in page-locked memory for the GPU copy; None: when CUDA is available

    def __post_init__(self):
        # (path, weight) pairs, {"path", "weight"} mappings (Hydra/OmegaConf configs) or DatasetSpecs
        self.datasets = [d if isinstance(d, DatasetSpec) else
                         DatasetSpec(**d) if isinstance(d, Mapping) else DatasetSpec(*d) for d in self.datasets]
        if not self.datasets:
            raise ValueError("LoaderConfig.datasets is empty: give at least one (path, weight)")
        if self.on_empty_dataset not in ON_EMPTY_DATASET:
            raise ValueError(f"on_empty_dataset={self.on_empty_dataset!r}: use one of {ON_EMPTY_DATASET}")
        seen: dict[str, int] = {}
        for d in self.datasets:  # names are unique: the data trace counts samples per dataset name
            name = d.name or default_name(d.path)
            seen[name] = seen.get(name, 0) + 1
            d.name = name if seen[name] == 1 else f"{name}#{seen[name]}"


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
        self.pin = torch.cuda.is_available() if cfg.pin_memory is None else bool(cfg.pin_memory)
        self.urls = [expand_shards(d.path) for d in cfg.datasets]
        for urls in self.urls:
            check_shards_exist(urls)
        per_rank = max(1, num_workers)
        self.consumers = [Consumer(dp_rank * per_rank + w, dp_size * per_rank) for w in range(per_rank)]
        self._worker_states: list[dict | None] = [None] * per_rank
        self._done = [False] * per_rank
        self._next_worker = 0
        self._pool: WorkerPool | None = None
        self._reader: PinningReader | None = None
        self._local = None
        if num_workers == 0:  # everything in this process: the encoder and its tokenizer live here
            encoder = SampleEncoder(load_tokenizer(cfg.tokenizer_path), replace(cfg.processing, seq_length=seq_length))
            self._local = PackedStream(cfg, self.urls, seq_length=seq_length, pad_multiple=pad_multiple,
                                       consumer=self.consumers[0], seed=seed, encoder=encoder,
                                       pixel_rows=pinned_rows if self.pin else None)

    @property
    def stream(self) -> PackedStream | None:
        """The in-process pipeline (``num_workers=0``), e.g. for throughput counters; else None."""
        return self._local

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> PackedBatch:
        if self._local is not None:
            return next(self._local)
        if self._pool is None:
            self._pool = WorkerPool(self.cfg, self.urls, self.seq_length, self.pad_multiple, self.consumers,
                                    self.seed, self._worker_states)
            if self.pin:
                self._reader = PinningReader(self._pool, self._done, self._next_worker, self.cfg.prefetch)
        while not all(self._done):
            worker = self._next_worker
            self._next_worker = (worker + 1) % len(self._done)
            if self._done[worker]:
                continue
            if self._reader is not None:
                got, batch, state = self._reader.get()
                if got != worker:  # the reader died: ``state`` is why
                    self.close()
                    raise state
            else:
                batch, state = self._pool.get(worker)
            if isinstance(batch, str) and batch == ERROR:
                self.close()
                raise state  # the worker's own exception, its traceback attached as a note
            self._worker_states[worker] = state
            if isinstance(batch, str) and batch == END:
                self._done[worker] = True
                continue
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

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """``state``: every data-parallel rank's ``state_dict()`` of the saved run, in rank order (or, under
        the same layout, this rank's alone). Call before the first batch."""
        states = list(state) if isinstance(state, (list, tuple)) else [state]
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {s.get('version')} is not {STATE_VERSION}: it was saved by "
                                 "an older qwen3vl; resume with that version, or start the data afresh")
        if self._pool is not None:
            raise RuntimeError("load_state_dict must be called before the first batch is drawn")
        layout = {k: self.layout[k] for k in ("dp_size", "num_workers")}
        saved = [{k: s["layout"][k] for k in ("dp_size", "num_workers")} for s in states]
        if all(s == layout for s in saved):
            mine = [s for s in states if s["layout"]["dp_rank"] == self.layout["dp_rank"]]
            if not mine:
                raise ValueError(f"no loader state of data-parallel rank {self.layout['dp_rank']} among those given")
            self._restore(mine[0]["workers"], int(mine[0]["next_worker"]), list(mine[0]["done"]))
            return
        if len(states) != saved[0]["dp_size"]:
            raise ValueError(f"the loader state was saved with {saved[0]} and this run has {layout}: continuing it "
                             f"needs the state of every one of the {saved[0]['dp_size']} saved data-parallel ranks "
                             f"(got {len(states)}); pass them all, as the checkpoint holds them")
        workers = repartition(states, self.cfg, self.urls, seed=self.seed, consumers=self.consumers)
        log.warning("data loader: the position saved with %s continues under %s (re-partitioned: every sample "
                    "of the epochs in progress still once)", saved[0], layout)
        self._restore(workers, 0, [False] * len(self.consumers))

    def _restore(self, workers: list, next_worker: int, done: list[bool]) -> None:
        self._next_worker, self._done = next_worker, done
        if self._local is not None:
            self._local.load_state_dict(workers[0])
        else:
            self._worker_states = list(workers)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
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
