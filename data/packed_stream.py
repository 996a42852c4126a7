"""One consumer's whole pipeline in one process, with an exact state that never holds pixels.

Per dataset a ``ShardStream`` (rank × worker shard assignment, seeded shard order, block shuffle) ->
the ``WeightedMixture`` picks the dataset of each next sample -> ``SampleEncoder`` (bad samples skipped
and counted by ``SkipTracker``) -> the online packer -> ``PackedBatch`` rows.

State: the streams, the mixture and the skip counters are positions, RNG states and counts. The
packer's buffer may hold hundreds of encoded samples with their pixels, and rows it has decided but we
have not returned yet; instead of saving them, the packer is pickled as of the last moment it held no
unreturned row, with every encoded sample replaced by its provenance (dataset, epoch, position in the
stream, chunk number), together with the provenance of the samples added since and the number of rows
returned since. On restore those raw samples are re-read (one shuffle block each) and re-encoded,
which is deterministic, and the additions are replayed. So the state is a few kB whatever the packer
holds, for any deterministic packer that keeps the ``EncodedSample`` objects it is given.

A dataset without a readable shard (``EmptyDatasetError``, qwen3vl.data.dataset_errors) stops the run
unless ``on_empty_dataset="drop"``: then it leaves the mixture like a finished dataset (the other
weights renormalise), said once by consumer 0 and counted there as ``empty_dataset``.

The state also lists ``pending``: the provenance of every sample emitted by a stream but not yet in a
returned row. With the streams' positions that is everything a change of layout needs
(``qwen3vl.data.elastic``): what was trained on, and what was drawn but must still be trained on.
A state made by that re-partitioning has no packer snapshot (a fresh packer) and lists the samples
handed over to this consumer as added since.
"""
from __future__ import annotations

import io
import logging
import pickle
import weakref
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from PIL import Image

from qwen3vl.data.batch import PackedBatch, SampleOrigin
from qwen3vl.data.dataset_errors import EmptyDatasetError
from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.mixture import WeightedMixture
from qwen3vl.data.packing import OnlinePacker
from qwen3vl.data.pixel_memory import ReusedRows
from qwen3vl.data.robust import SkipTracker
from qwen3vl.data.sample_format import BadSample
from qwen3vl.data.shards import SkippedRecord
from qwen3vl.data.stream import CARRIED, Consumer, Position, ShardStream

if TYPE_CHECKING:
    from qwen3vl.data.loader import LoaderConfig

log = logging.getLogger("qwen3vl.data")
FLUSH = "flush"  # marks the end-of-data flush of the packer in the replay log
# What a corrupt medium may raise from inside PIL or a video decoder. Programming errors (TypeError,
# KeyError, AttributeError...) are deliberately not here: they must stop the run, not be skipped.
DECODE_ERRORS = (OSError, EOFError, SyntaxError, zlib.error, Image.DecompressionBombError, ValueError)


@dataclass(frozen=True)
class Provenance:
    source: int
    position: Position
    chunk: int


def _plain(entry: Provenance | str) -> list[int] | str:
    """Builtins only, so a checkpoint holding the state loads with ``torch.load(weights_only=True)``."""
    if entry == FLUSH:
        return FLUSH
    return [entry.source, entry.position.epoch, entry.position.index, entry.chunk]


def _from_plain(entry: list[int] | str) -> Provenance | str:
    if entry == FLUSH:
        return FLUSH
    source, epoch, index, chunk = entry
    return Provenance(source, Position(epoch, index), chunk)


class _ProvenancePickler(pickle.Pickler):
    def __init__(self, file, provenance: dict[int, tuple[weakref.ref, Provenance]]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._provenance = provenance

    def persistent_id(self, obj):
        entry = self._provenance.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None


class _ProvenanceUnpickler(pickle.Unpickler):
    def __init__(self, file, resolve):
        super().__init__(file)
        self._resolve = resolve

    def persistent_load(self, pid):
        return self._resolve(pid)


def row_patch_limit(cfg: LoaderConfig, seq_length: int, merge_size: int) -> int:
    """The most ViT patches one packed row can hold: merge² per token, and the packer's cap."""
    row_patches = seq_length * merge_size ** 2
    return row_patches if cfg.max_patches_per_row is None else min(row_patches, cfg.max_patches_per_row)


class PackedStream:
    """The whole pipeline of one consumer, in this process."""

    def __init__(self, cfg: LoaderConfig, urls: Sequence[Sequence[str]], *, seq_length: int, pad_multiple: int,
                 consumer: Consumer, seed: int, encoder: SampleEncoder,
                 pixel_rows: Callable[[int], torch.Tensor] | None = None, max_samples: int | None = None,
                 max_tokens: int | None = None):
        """``max_samples`` / ``max_tokens``: a finite pass (the held-out sets of evaluation): the data ends,
        and the packer is flushed, after this many raw samples, or once the encoded samples hold this many
        tokens; None: the datasets' own end (``cfg.num_epochs``)."""
        self.max_samples, self.max_tokens = max_samples, max_tokens
        self._raw_samples = 0
        self.cfg, self.seq_length, self.pad_multiple = cfg, seq_length, pad_multiple
        self.consumer = consumer
        self.streams = [ShardStream(u, consumer, seed=seed, source_id=i, shuffle_buffer=cfg.shuffle_buffer,
                                    shuffle_shards=cfg.shuffle_shards, num_epochs=cfg.num_epochs,
                                    name=d.name, pattern=d.path)
                        for i, (u, d) in enumerate(zip(urls, cfg.datasets, strict=True))]
        self.mixture = WeightedMixture([d.weight for d in cfg.datasets], seed, consumer.index)
        self.tracker = SkipTracker(cfg.max_consecutive_failures)
        self.encoder = encoder
        self.pixel_rows = pixel_rows if pixel_rows is not None else ReusedRows(
            max_patches=row_patch_limit(cfg, seq_length, encoder.cfg.merge_size))
        self.packer = OnlinePacker(seq_length, pad_multiple, buffer_size=cfg.pack_buffer,
                                   max_patches=cfg.max_patches_per_row, pixel_rows=self.pixel_rows)
        self._provenance: dict[int, tuple[weakref.ref, Provenance]] = {}
        self._shard_of: dict[int, str] = {}
        self._ready: list[list] = []  # rows the packer decided, not yet built and returned
        self._flushed = False
        self.tokens_encoded = 0  # tokens of every sample handed to the packer (throughput measurements)
        # Exact state without saving pixels: the packer pickled (samples by provenance) when it last held
        # no unreturned row, the provenance of every sample added since, and how many rows were returned.
        self._snapshot: bytes | None = None
        self._log: list = []
        self._consumed = 0

    # --- producing samples ---------------------------------------------------------------------
    def _encode(self, record, source: int, position: Position) -> list:
        if isinstance(record, SkippedRecord):
            self.tracker.skip(record.shard, record.key, record.reason, record.message)
            return []
        try:
            samples = self.encoder.encode(record)
        except BadSample as exc:
            self.tracker.skip(record.shard, record.key, exc.reason, exc.message)
            return []
        except DECODE_ERRORS as exc:
            self.tracker.skip(record.shard, record.key, "undecodable", f"{type(exc).__name__}: {exc}")
            return []
        self.tracker.success()
        pairs = [(sample, Provenance(source, position, chunk)) for chunk, sample in enumerate(samples)]
        for sample, provenance in pairs:
            self._track(sample, provenance, record.shard)
        return pairs

    def _track(self, sample, provenance: Provenance, shard: str) -> None:
        """Remembers where ``sample`` came from for as long as it lives (the weakref drops the entry),
        and tags it with its origin for the data trace."""
        key = id(sample)
        self._provenance[key] = (weakref.ref(sample, lambda _, k=key: self._forget(k)), provenance)
        self._shard_of[key] = shard
        position = provenance.position
        epoch = self.streams[provenance.source].carried[position.index][0] if position.epoch == CARRIED \
            else position.epoch
        sample.origin = SampleOrigin(f"{shard}:{sample.key}", self.cfg.datasets[provenance.source].name, epoch,
                                     sample.length, provenance.chunk)

    def _forget(self, key: int) -> None:
        self._provenance.pop(key, None)
        self._shard_of.pop(key, None)

    def _next_samples(self) -> list | None:
        """(sample, provenance) pairs of the next raw sample of the mixture; None when all are done."""
        if (self.max_samples is not None and self._raw_samples >= self.max_samples) or \
                (self.max_tokens is not None and self.tokens_encoded >= self.max_tokens):
            return None
        while not self.mixture.exhausted:
            source = self.mixture.next_source()
            try:
                position, record = next(self.streams[source])
            except StopIteration:
                self.mixture.retire(source)
                continue
            except EmptyDatasetError as error:
                self._drop(source, error)
                continue
            self._raw_samples += 1
            return self._encode(record, source, position)
        return None

    def _drop(self, source: int, error: EmptyDatasetError) -> None:
        """``on_empty_dataset``: "stop" re-raises; "drop" takes the dataset out of the mixture."""
        if self.cfg.on_empty_dataset != "drop":
            raise error
        self.mixture.retire(source)
        if self.mixture.exhausted:
            raise EmptyDatasetError(f"every dataset is empty or finished (data.on_empty_dataset=drop), the "
                                    f"last: {error.summary}", error.dataset, error.fix) from error
        if self.consumer.index == 0:  # every consumer drops it (same files, same verdict); one says so
            share = self.mixture.weights * self.mixture.active
            mix = ", ".join(f"{s.name} {w / share.sum():.3g}" for s, w in zip(self.streams, share) if w > 0)
            log.warning("%s; data.on_empty_dataset=drop: it leaves the mixture for the rest of the run, the "
                        "others now weigh %s", error.summary, mix)
            self.tracker.count("empty_dataset")

    # --- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> PackedBatch:
        while not self._ready:
            if self._flushed:
                raise StopIteration
            samples = self._next_samples()
            if not self._log:  # the packer holds no unreturned row: remember it as it is now
                self._snapshot, self._consumed = self._pickle_packer(), 0
            if samples is None:
                self._log.append(FLUSH)
                self.packer.finish()
                self._ready.extend(self.packer.pop_groups())
                self._flushed = True
                continue
            for sample, provenance in samples:
                self._log.append(provenance)
                self._add(sample, report=True)
                self.tokens_encoded += sample.length
            self._ready.extend(self.packer.pop_groups())
        self._consumed += 1
        row = self.packer.build(self._ready.pop(0))  # built only now: one row's pixels at a time
        if not self._ready:
            self._log, self._snapshot = [], None
        return row

    def _add(self, sample, report: bool) -> None:
        before = self.packer.dropped.copy()
        self.packer.add(sample)
        dropped = self.packer.dropped - before
        if report and dropped:
            self.tracker.skip(self._shard_of.get(id(sample), "?"), sample.key, next(iter(dropped)),
                              f"the packer cannot fit it into a row of {self.seq_length} tokens")

    # --- state ---------------------------------------------------------------------------------
    def _pickle_packer(self) -> bytes:
        buffer = io.BytesIO()
        _ProvenancePickler(buffer, self._provenance).dump(self.packer)
        return buffer.getvalue()

    def state_dict(self) -> dict:
        """Positions, RNG states and counters, plus the packer as of the last time it held no unreturned
        row (samples by provenance) and the samples added since (by provenance)."""
        snapshot = self._snapshot if self._log else self._pickle_packer()
        pending = self.packer.buffered + [sample for group in self._ready for sample in group]
        return {"consumer": [self.consumer.index, self.consumer.count],
                "streams": [s.state_dict() for s in self.streams], "mixture": self.mixture.state_dict(),
                "skips": self.tracker.state_dict(), "flushed": self._flushed, "packer": snapshot,
                "added_since": [_plain(p) for p in self._log], "returned_since": self._consumed if self._log else 0,
                "pending": [_plain(self._provenance[id(sample)][1]) for sample in pending]}

    def load_state_dict(self, state: dict) -> None:
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
        self.mixture.load_state_dict(state["mixture"])
        self.tracker.load_state_dict(state["skips"])
        self._flushed = bool(state["flushed"])
        log = [_from_plain(p) for p in state["added_since"]]
        needed: list[Provenance] = [p for p in log if p != FLUSH]
        snapshot = state["packer"] if state["packer"] is not None else self._pickle_packer()  # None: a fresh one
        _ProvenanceUnpickler(io.BytesIO(snapshot), needed.append).load()
        samples = self._replay(needed)
        self.packer = _ProvenanceUnpickler(io.BytesIO(snapshot), samples.__getitem__).load()
        self.packer.pixel_rows = self.pixel_rows
        self._snapshot, self._log, self._ready = snapshot, log, []
        for provenance in self._log:  # redo what happened since the snapshot, without re-reporting
            if provenance == FLUSH:
                self.packer.finish()
            elif provenance in samples:  # a sample the packer had dropped was re-encoded all the same
                self._add(samples[provenance], report=False)
            self._ready.extend(self.packer.pop_groups())
        self._consumed = int(state["returned_since"])
        del self._ready[:self._consumed]
        if not self._ready:
            self._log, self._snapshot = [], None

    def _replay(self, needed: list[Provenance]) -> dict[Provenance, object]:
        """Re-reads and re-encodes the raw samples behind ``needed`` (deterministic, so identical)."""
        out: dict[Provenance, object] = {}
        for source, stream in enumerate(self.streams):
            positions = sorted({p.position for p in needed if p.source == source},
                               key=lambda q: (q.epoch, q.index))
            for position, record in zip(positions, stream.read_at(positions)):
                for chunk, sample in enumerate(self.encoder.encode(record)):
                    provenance = Provenance(source, position, chunk)
                    out[provenance] = sample
                    self._track(sample, provenance, record.shard)
        return out

    def skipped_counts(self) -> dict[str, int]:
        return self.tracker.skipped_counts()
