"""One dataset's sample stream for one consumer (a data-parallel rank × loader worker), with exact state.

Plan of an epoch: a list of ``WorkItem``s, each a shard and which of its records this consumer takes.
The shard list is permuted with a seed shared by all ranks (seed, dataset, epoch). With at least as
many shards as consumers, consumer ``c`` of ``C`` takes shards ``c, c+C, ...`` of that order whole;
with fewer, shard ``c mod S`` is shared by the consumers ``c' ≡ c (mod S)``, each taking every k-th of
its records. Either way every record of an epoch goes to exactly one consumer. After a change of
layout (``qwen3vl.data.elastic``) the epochs in progress get explicit plans instead: the shards with
records left, each item excluding the records already consumed, spread over the new consumers.

Shuffling: on top of the shard order, records are shuffled in blocks of ``shuffle_buffer``: a block is
read into memory and emitted in a permutation seeded by (seed, dataset, epoch, consumer, block).
Compared with a sliding reservoir this mixes as locally, and it makes the state tiny and exact: the
position in the epoch (``emitted``) says which block and which slot come next. Restoring re-reads that
block's raw bytes (no decode) and skips whole shards whose record count is already known; the same
arithmetic maps any position back to its shard and record (``locate``), which is what lets the
position of every consumer be re-partitioned over another number of consumers.

A record is a ``RawSample`` or a ``SkippedRecord`` (a tar-level failure); both take one position, so
positions never depend on what the encoder later accepts. An epoch that gives this consumer no
``RawSample`` at all raises a ``DatasetError`` naming the dataset (qwen3vl.data.dataset_errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from qwen3vl.data.dataset_errors import unreadable_epoch_error
from qwen3vl.data.shards import SkippedRecord, read_shard

CARRIED = -1  # Position.epoch of a sample handed over at a layout change (index into ``carried``)


@dataclass(frozen=True)
class Consumer:
    """This reader's slot: ``index`` in ``[0, count)``, ``count`` = dp_size × max(1, num_workers)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"consumer index {self.index} outside [0, {self.count})")


@dataclass(frozen=True)
class Position:
    """Where a record sits in its stream: its epoch and its emission index in that epoch (or, with
    epoch ``CARRIED``, its index in the stream's list of records carried over a layout change)."""

    epoch: int
    index: int


def to_ranges(indices: np.ndarray) -> list[list[int]]:
    """Sorted unique ints as [start, stop) runs: a consumed prefix of a shard is one pair."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [[int(indices[a]), int(indices[b - 1]) + 1] for a, b in zip(starts, stops)]


def from_ranges(ranges: Sequence[Sequence[int]]) -> np.ndarray:
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


@dataclass(frozen=True)
class WorkItem:
    """Records of one or more shards for one consumer: the records of ``shards`` in that order, less
    those in ``excludes`` (per shard, sorted indices consumed before a layout change), of which it
    takes those whose rank is ``offset`` modulo ``stride``. One shard whole is the common case; a
    dataset with fewer shards than consumers gives each consumer one item over all of them with
    stride = consumers, so the records are dealt out evenly whatever the shard sizes."""

    shards: tuple[int, ...]
    stride: int = 1
    offset: int = 0
    excludes: tuple[np.ndarray, ...] = field(default=(), compare=False)

    def _exclude(self, k: int) -> np.ndarray:
        return self.excludes[k] if self.excludes else _NONE

    def _free(self, sizes: dict[int, int]) -> list[int | None]:
        """Records left in each shard after the exclusions (None where the size is not known yet)."""
        return [sizes[u] - int(np.searchsorted(self._exclude(k), sizes[u])) if u in sizes else None
                for k, u in enumerate(self.shards)]

    def wanted_count(self, sizes: dict[int, int]) -> int | None:
        free = self._free(sizes)
        if None in free:
            return None
        return max(0, -(-(sum(free) - self.offset) // self.stride))

    def locate(self, ranks: np.ndarray, sizes: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(shards, record indices) of this item's wanted records number ``ranks`` (read before: they lie
        in shards of known size or in the first one of unknown size)."""
        free = self._free(sizes)
        known = free[:free.index(None)] if None in free else free
        bases = np.cumsum([0] + known)
        among = self.offset + self.stride * np.asarray(ranks, dtype=np.int64)  # rank among non-excluded
        which = np.searchsorted(bases, among, side="right") - 1
        records = among - bases[which]
        for k in np.unique(which).tolist():
            exclude = self._exclude(k)
            if len(exclude):
                here = which == k
                records[here] += np.searchsorted(exclude - np.arange(len(exclude)), records[here], side="right")
        return np.asarray(self.shards, dtype=np.int64)[which], records

    def to_state(self) -> list:
        return [list(self.shards), self.stride, self.offset, [to_ranges(e) for e in self.excludes]]

    @classmethod
    def from_state(cls, state: Sequence) -> "WorkItem":
        shards, stride, offset, excludes = state
        return cls(tuple(int(u) for u in shards), int(stride), int(offset), tuple(from_ranges(e) for e in excludes))


_NONE = np.zeros(0, dtype=np.int64)


class _Counted:
    """Iterates ``records`` and counts them (the shard's size once it is exhausted)."""

    def __init__(self, records: Iterator):
        self._records, self.count = records, 0

    def __iter__(self):
        for record in self._records:
            self.count += 1
            yield record


def _seeded_rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def shard_order(seed: int, source: int, epoch: int, num_shards: int, shuffle: bool) -> list[int]:
    """The epoch's global shard order (the same on every rank and under every layout)."""
    if not shuffle:
        return list(range(num_shards))
    return _seeded_rng(seed, source, epoch, 0x5A4D).permutation(num_shards).tolist()


def fresh_plan(order: Sequence[int], consumer: Consumer) -> list[WorkItem]:
    """``order``'s shards split over the consumers (see the module docstring)."""
    c, C = consumer.index, consumer.count
    if len(order) >= C:
        return [WorkItem((order[i],)) for i in range(c, len(order), C)]
    return [WorkItem(tuple(order), stride=C, offset=c)]


class ShardStream:
    def __init__(self, urls: Sequence[str], consumer: Consumer, *, seed: int, source_id: int = 0,
                 shuffle_buffer: int = 1000, shuffle_shards: bool = True, num_epochs: int | None = None,
                 name: str | None = None, pattern: str | None = None):
        if not urls:
            raise ValueError("a stream needs at least one shard")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (1 = no sample shuffle), got {shuffle_buffer}")
        self.urls, self.consumer = list(urls), consumer
        self.seed, self.source_id = seed, source_id
        self.shuffle_buffer, self.shuffle_shards, self.num_epochs = shuffle_buffer, shuffle_shards, num_epochs
        self.name = name if name is not None else f"#{source_id}"  # for messages: the configured name
        self.pattern = pattern if pattern is not None else "::".join(self.urls)
        self.epoch, self.emitted = 0, 0
        self._readable = False  # this epoch has emitted a RawSample (not only SkippedRecords)
        self.sizes: dict[int, int] = {}  # records in each shard read to its end (any epoch: files do not change)
        self.plans: dict[int, list[WorkItem]] = {}  # explicit plans of epochs re-partitioned at a layout change
        self.generation = 0  # layout changes so far (seeds new shuffles so they do not repeat old ones)
        self.carried: list[tuple[int, int, int]] = []  # (epoch, shard, record) handed over at a layout change
        self._block: list | None = None  # the current block's records, in emission order
        self._block_no = -1
        self._reader: Iterator | None = None  # raw records of this epoch after the last loaded block
        self._reader_block = -1  # the block the reader yields next

    # --- the plan of an epoch ------------------------------------------------------------------
    def plan(self, epoch: int) -> list[WorkItem]:
        if epoch in self.plans:
            return self.plans[epoch]
        order = shard_order(self.seed, self.source_id, epoch, len(self.urls), self.shuffle_shards)
        return fresh_plan(order, self.consumer)

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this consumer reads in ``epoch``, in order."""
        return [self.urls[shard] for item in self.plan(epoch) for shard in item.shards]

    def _item_lengths(self, epoch: int) -> list[int | None]:
        """Wanted records of each item of ``epoch``'s plan; None where a shard's size is not known yet."""
        return [item.wanted_count(self.sizes) for item in self.plan(epoch)]

    def _item_records(self, item: WorkItem, start: int) -> Iterator[tuple[int, int, object]]:
        """(shard, record index, record) of ``item``'s wanted records from the ``start``-th on. Shards
        whose wanted records all come before ``start`` are skipped unopened when their size is known;
        each shard read to its end has its size recorded."""
        rank = 0  # among the item's non-excluded records
        for k, shard in enumerate(item.shards):
            exclude = item._exclude(k)
            if shard in self.sizes:
                free = self.sizes[shard] - int(np.searchsorted(exclude, self.sizes[shard]))
                if -(-(rank + free - item.offset) // item.stride) <= start:
                    rank += free
                    continue
            records = _Counted(read_shard(self.urls[shard]))
            e = 0
            for index, record in enumerate(records):
                while e < len(exclude) and exclude[e] < index:
                    e += 1
                if e < len(exclude) and exclude[e] == index:
                    continue
                if rank % item.stride == item.offset and (rank - item.offset) // item.stride >= start:
                    yield shard, index, record
                rank += 1
            self.sizes[shard] = records.count  # read to its end

    def _records_from(self, epoch: int, start: int) -> Iterator[tuple[int, int, object]]:
        """This consumer's records of ``epoch`` from its ``start``-th one on, as (shard, record index, record)."""
        base = 0  # sequence index of the current item's first wanted record
        for item, length in zip(self.plan(epoch), self._item_lengths(epoch)):
            if length is not None and base + length <= start:
                base += length  # nothing wanted in it
                continue
            yield from self._item_records(item, max(0, start - base))
            base += item.wanted_count(self.sizes)  # every shard of it is known now

    def _block_seed(self, epoch: int, block: int) -> list[int]:
        words = [self.seed, self.source_id, epoch, self.consumer.count, self.consumer.index, block, 0xB10C]
        return words + [self.generation] if self.generation else words

    def _block_order(self, epoch: int, block: int, size: int) -> np.ndarray:
        return _seeded_rng(*self._block_seed(epoch, block)).permutation(size)

    def _emitted_order(self, epoch: int, block: int) -> np.ndarray:
        """Sequence indices of ``block``'s records in emission order (the block was read before: the
        last block of an epoch may be short, and then every shard size is known)."""
        lengths = self._item_lengths(epoch)
        size = self.shuffle_buffer
        if None not in lengths:
            size = min(size, sum(lengths) - block * self.shuffle_buffer)
        return block * self.shuffle_buffer + self._block_order(epoch, block, size)

    def _read_block(self, epoch: int, block: int, reader: Iterator) -> list:
        records = []
        for entry in reader:
            records.append(entry)
            if len(records) == self.shuffle_buffer:
                break
        return [records[i] for i in self._block_order(epoch, block, len(records))]

    # --- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> tuple[Position, object]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            block, slot = divmod(self.emitted, self.shuffle_buffer)
            if self._block_no != block:
                if self._reader is None or self._reader_block != block:
                    self._reader = self._records_from(self.epoch, block * self.shuffle_buffer)
                self._block, self._block_no = self._read_block(self.epoch, block, self._reader), block
                self._reader_block = block + 1
            if slot < len(self._block):
                position = Position(self.epoch, self.emitted)
                self.emitted += 1
                record = self._block[slot][2]
                self._readable = self._readable or not isinstance(record, SkippedRecord)
                return position, record
            # An epoch of nothing but failures: never spin through empty epochs. (A share re-planned at a
            # layout change may rightly be empty: what is left of the epoch went to other consumers.)
            if not self._readable and self.epoch not in self.plans:
                raise unreadable_epoch_error(
                    self.name, self.pattern, self.urls, self.epoch_shards(self.epoch), self.epoch,
                    f"consumer {self.consumer.index} of {self.consumer.count} (data-parallel ranks × loader "
                    "workers)", self.emitted)
            self.epoch, self.emitted, self._readable = self.epoch + 1, 0, False
            self._block, self._block_no, self._reader, self._reader_block = None, -1, None, -1

    # --- where records are -------------------------------------------------------------------
    def _item_of(self, epoch: int, sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(item number, rank within the item) of sequence indices; the records read so far all lie in
        items of known length or in the first item of unknown length."""
        lengths = self._item_lengths(epoch)
        known = lengths[:lengths.index(None)] if None in lengths else lengths
        bases = np.cumsum([0] + known)
        items = np.searchsorted(bases, sequence, side="right") - 1
        return items, sequence - bases[items]

    def _records_at(self, epoch: int, sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shards, record indices) of sequence indices of ``epoch``."""
        plan = self.plan(epoch)
        items, ranks = self._item_of(epoch, np.asarray(sequence, dtype=np.int64))
        shards, records = np.zeros(len(items), dtype=np.int64), np.zeros(len(items), dtype=np.int64)
        for item_no in np.unique(items).tolist():
            here = items == item_no
            shards[here], records[here] = plan[item_no].locate(ranks[here], self.sizes)
        return shards, records

    def locate(self, positions: Sequence[Position]) -> list[tuple[int, int, int]]:
        """(epoch, shard, record index) of each emitted position."""
        out: list = [None] * len(positions)
        by_block: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(positions):
            if p.epoch == CARRIED:
                out[i] = tuple(self.carried[p.index])
            else:
                by_block.setdefault((p.epoch, p.index // self.shuffle_buffer), []).append(i)
        for (epoch, block), which in by_block.items():
            order = self._emitted_order(epoch, block)
            shards, records = self._records_at(epoch, order[[positions[i].index % self.shuffle_buffer for i in which]])
            for i, shard, index in zip(which, shards.tolist(), records.tolist()):
                out[i] = (epoch, shard, index)
        return out

    def consumed(self, epoch: int) -> dict[int, np.ndarray]:
        """Record indices emitted in ``epoch`` by this consumer, by shard (for re-partitioning).
        Epochs before the current one were emitted whole; later ones not at all."""
        if epoch > self.epoch:
            return {}
        lengths = self._item_lengths(epoch)
        finished = epoch < self.epoch or (self.num_epochs is not None and epoch >= self.num_epochs)
        block, slot = divmod(self.emitted, self.shuffle_buffer)
        prefix = sum(lengths) if finished else block * self.shuffle_buffer  # [0, prefix) were emitted
        sequence = [np.arange(prefix, dtype=np.int64)]
        if slot and not finished:
            sequence.append(self._emitted_order(epoch, block)[:slot])
        shards, records = self._records_at(epoch, np.concatenate(sequence))
        return {int(u): np.unique(records[shards == u]) for u in np.unique(shards).tolist()}

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "emitted": self.emitted, "readable": self._readable,
                "num_shards": len(self.urls), "sizes": {int(k): int(v) for k, v in self.sizes.items()}, "generation": self.generation,
                "plans": {int(e): [item.to_state() for item in items] for e, items in self.plans.items()},
                "carried": [list(c) for c in self.carried]}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("num_shards", len(self.urls))) != len(self.urls):
            raise ValueError(f"dataset {self.name!r} had {state['num_shards']} shards when the loader state was "
                             f"saved and has {len(self.urls)} now: positions in it cannot carry over. Resume with "
                             "the shards the run started with, or start this stage afresh")
        self.epoch, self.emitted = int(state["epoch"]), int(state["emitted"])
        self._readable = bool(state.get("readable", self.emitted > 0))
        self.sizes = {int(k): int(v) for k, v in state["sizes"].items()}
        self.generation = int(state["generation"])
        self.plans = {int(e): [WorkItem.from_state(i) for i in items] for e, items in state["plans"].items()}
        self.carried = [tuple(int(x) for x in c) for c in state["carried"]]
        self._block, self._block_no, self._reader, self._reader_block = None, -1, None, -1

    def read_at(self, positions: Sequence[Position]) -> list:
        """The records at earlier ``positions`` of this stream, in the given order.

        Used on restore to rebuild what downstream buffers held; reads each needed block once, and each
        carried record from its shard."""
        wanted: dict[tuple[int, int], list[int]] = {}
        found: dict[Position, object] = {}
        carried = [p for p in positions if p.epoch == CARRIED]
        for p, record in zip(carried, self.read_records([self.carried[p.index][1:] for p in carried])):
            found[p] = record
        for p in positions:
            if p.epoch != CARRIED:
                wanted.setdefault((p.epoch, p.index // self.shuffle_buffer), []).append(p.index)
        for (epoch, block), indices in sorted(wanted.items()):
            records = self._read_block(epoch, block, self._records_from(epoch, block * self.shuffle_buffer))
            for index in indices:
                found[Position(epoch, index)] = records[index - block * self.shuffle_buffer][2]
        return [found[p] for p in positions]

    def read_records(self, where: Sequence[Sequence[int]]) -> list:
        """The records at (shard, record index) pairs, each shard read once up to the last one needed."""
        needed: dict[int, set[int]] = {}
        for shard, index in where:
            needed.setdefault(int(shard), set()).add(int(index))
        found: dict[tuple[int, int], object] = {}
        for shard, indices in needed.items():
            last = max(indices)
            for index, record in enumerate(read_shard(self.urls[shard])):
                if index in indices:
                    found[shard, index] = record
                if index == last:
                    break
        return [found[int(s), int(i)] for s, i in where]
