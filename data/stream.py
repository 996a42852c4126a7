"""One dataset's sample stream for one consumer (a data-parallel rank × loader worker), with exact state.

Assignment, per epoch: the shard list is permuted with a seed shared by all ranks (seed, dataset,
epoch). With at least as many shards as consumers, consumer ``c`` of ``C`` reads shards ``c, c+C,
...`` of that order; with fewer, every consumer reads every shard and keeps the records whose index in
the epoch is ``c`` modulo ``C``. Either way every record of an epoch goes to exactly one consumer.

Shuffling: on top of the shard order, records are shuffled in blocks of ``shuffle_buffer``: a block is
read into memory and emitted in a permutation seeded by (seed, dataset, epoch, consumer, block).
Compared with a sliding reservoir this mixes as locally, and it makes the state tiny and exact: the
position in the epoch (``emitted``) says which block and which slot come next. Restoring re-reads that
block's raw bytes (no decode) and skips whole shards whose record count is already known.

A record is a ``RawSample`` or a ``SkippedRecord`` (a tar-level failure); both take one position, so
positions never depend on what the encoder later accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from qwen3vl.data.shards import read_shard


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
    """Where a record sits in its stream: its epoch and its emission index in that epoch."""

    epoch: int
    index: int


def _seeded_rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class ShardStream:
    def __init__(self, urls: Sequence[str], consumer: Consumer, *, seed: int, source_id: int = 0,
                 shuffle_buffer: int = 1000, shuffle_shards: bool = True, num_epochs: int | None = None):
        if not urls:
            raise ValueError("a stream needs at least one shard")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (1 = no sample shuffle), got {shuffle_buffer}")
        self.urls, self.consumer = list(urls), consumer
        self.seed, self.source_id = seed, source_id
        self.shuffle_buffer, self.shuffle_shards, self.num_epochs = shuffle_buffer, shuffle_shards, num_epochs
        self.epoch, self.emitted = 0, 0
        # Records in each fully read shard of an epoch's plan, for the current and the previous epoch
        # (the previous one for restoring samples still buffered downstream across an epoch change).
        self._shard_lengths: dict[int, list[int]] = {0: []}
        self._block: list | None = None  # the current block's records, in emission order
        self._block_no = -1
        self._reader: Iterator | None = None  # raw records of this epoch after the last loaded block
        self._reader_block = -1  # the block the reader yields next

    # --- the plan of an epoch ------------------------------------------------------------------
    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this consumer reads in ``epoch``, in order."""
        order = list(self.urls)
        if self.shuffle_shards:
            perm = _seeded_rng(self.seed, self.source_id, epoch, 0x5A4D).permutation(len(order))
            order = [order[i] for i in perm]
        if len(order) >= self.consumer.count:
            return order[self.consumer.index::self.consumer.count]
        return order  # fewer shards than consumers: everyone reads all, split by record index below

    def _records_from(self, epoch: int, start: int) -> Iterator:
        """This consumer's records of ``epoch`` from its ``start``-th one on."""
        by_sample = len(self.urls) < self.consumer.count
        stride, offset = (self.consumer.count, self.consumer.index) if by_sample else (1, 0)
        first = start * stride + offset  # index of the first wanted record among all records read
        lengths = self._shard_lengths.setdefault(epoch, [])
        base = 0  # index of the current shard's first record
        for shard_no, url in enumerate(self.epoch_shards(epoch)):
            if shard_no < len(lengths) and base + lengths[shard_no] <= first:
                base += lengths[shard_no]  # known length, nothing wanted in it: not even opened
                continue
            count = 0
            for record in read_shard(url):
                index = base + count
                if index >= first and index % stride == offset:
                    yield record
                count += 1
            if shard_no == len(lengths):
                lengths.append(count)
            base += count

    def _block_order(self, epoch: int, block: int, size: int) -> np.ndarray:
        rng = _seeded_rng(self.seed, self.source_id, epoch, self.consumer.count, self.consumer.index, block, 0xB10C)
        return rng.permutation(size)

    def _read_block(self, epoch: int, block: int, reader: Iterator) -> list:
        records = []
        for record in reader:
            records.append(record)
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
                return position, self._block[slot]
            if self.emitted == 0:
                raise RuntimeError(f"consumer {self.consumer.index} of {self.consumer.count} (data-parallel "
                                   f"ranks × loader workers) got no sample of dataset {self.source_id} in epoch "
                                   f"{self.epoch}: its shards are empty or hold fewer samples than there are "
                                   "consumers; add data or use fewer loader workers")
            self.epoch, self.emitted = self.epoch + 1, 0
            self._shard_lengths = {e: v for e, v in self._shard_lengths.items() if e >= self.epoch - 1}
            self._block, self._block_no, self._reader, self._reader_block = None, -1, None, -1

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "emitted": self.emitted,
                "shard_lengths": {int(e): list(v) for e, v in self._shard_lengths.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.emitted = int(state["epoch"]), int(state["emitted"])
        self._shard_lengths = {int(e): list(v) for e, v in state["shard_lengths"].items()}
        self._block, self._block_no, self._reader, self._reader_block = None, -1, None, -1

    def read_at(self, positions: Sequence[Position]) -> list:
        """The records at earlier ``positions`` of this stream, in the given order.

        Used on restore to rebuild what downstream buffers held; reads each needed block once.
        """
        wanted: dict[tuple[int, int], list[int]] = {}
        for p in positions:
            wanted.setdefault((p.epoch, p.index // self.shuffle_buffer), []).append(p.index)
        found: dict[Position, object] = {}
        for (epoch, block), indices in sorted(wanted.items()):
            records = self._read_block(epoch, block, self._records_from(epoch, block * self.shuffle_buffer))
            for index in indices:
                found[Position(epoch, index)] = records[index - block * self.shuffle_buffer]
        return [found[p] for p in positions]
