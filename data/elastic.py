"""Continuing a loader position under another layout: every sample of an epoch exactly once.

The saved loader state of a run is every data-parallel rank's state, each the states of its consumers
(rank × worker ``PackedStream``s). Together they say, per dataset, exactly which records every epoch
still in progress has given out (``ShardStream.consumed``: positions, shard sizes and plans are enough,
nothing is re-read) and which of those were not yet trained on (``pending``: in a packer's buffer or in
a row not yet returned). ``repartition`` turns that into states for the consumers of a new layout:

* the epochs in progress (from the lowest epoch any consumer is in to the highest) get explicit plans:
  in each, the shards with records left, each excluding the records already given out, dealt to the
  new consumers like a fresh epoch (whole shards round-robin, or one item over all of them with a
  stride when fewer shards than consumers are left); later epochs are planned as usual;
* the pending samples are handed to the new consumers round-robin (a record with all its pending
  chunks together), which re-read, re-encode and pack them first;
* mixtures start afresh from a seed that counts layout changes (``generation``); shuffles of the
  re-planned epochs are seeded with it too; skip counts are summed into the first consumer.

So no record is given out twice, none is left out, and what a packer held is trained on once. Under
the same layout none of this runs: each consumer restores its own state bit-exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from qwen3vl.data.stream import CARRIED, Consumer, Position, ShardStream, WorkItem, shard_order


def _streams(cfg, urls: Sequence[Sequence[str]], consumer: Consumer, seed: int) -> list[ShardStream]:
    return [ShardStream(u, consumer, seed=seed, source_id=i, shuffle_buffer=cfg.shuffle_buffer,
                        shuffle_shards=cfg.shuffle_shards, num_epochs=cfg.num_epochs) for i, u in enumerate(urls)]


def _consumer_states(rank_states: Sequence[dict]) -> list[tuple[Consumer, dict | None]]:
    """Every saved consumer with its state (None: a worker that never handed out a batch)."""
    out = []
    for state in rank_states:
        layout = state["layout"]
        per_rank = max(1, int(layout["num_workers"]))
        for w, worker in enumerate(state["workers"]):
            out.append((Consumer(int(layout["dp_rank"]) * per_rank + w, int(layout["dp_size"]) * per_rank), worker))
    counts = {c.count for c, _ in out}
    indices = sorted(c.index for c, _ in out)
    if len(counts) != 1 or indices != list(range(counts.pop())):
        raise ValueError(f"the loader states cover consumers {indices}: give the state of every data-parallel "
                         "rank of the saved run (the checkpoint holds them all)")
    return out


def _deal(remaining: list[int], consumed: dict[int, np.ndarray], count: int) -> list[list[WorkItem]]:
    """The shards with records left, each excluding what was given out, for ``count`` consumers."""
    excludes = [consumed.get(u, np.zeros(0, dtype=np.int64)) for u in remaining]
    if len(remaining) >= count:
        return [[WorkItem((remaining[i],), excludes=(excludes[i],)) for i in range(c, len(remaining), count)]
                for c in range(count)]
    if not remaining:
        return [[] for _ in range(count)]
    return [[WorkItem(tuple(remaining), stride=count, offset=c, excludes=tuple(excludes))] for c in range(count)]


def repartition(rank_states: Sequence[dict], cfg, urls: Sequence[Sequence[str]], *, seed: int,
                consumers: Sequence[Consumer]) -> list[dict]:
    """``PackedStream`` states for ``consumers`` (of a new layout) continuing the saved ``rank_states``."""
    saved = _consumer_states(rank_states)
    new_count = consumers[0].count
    old = []  # (streams with their saved positions, pending provenances, skip counts)
    for consumer, state in saved:
        streams = _streams(cfg, urls, consumer, seed)
        if state is not None:
            for stream, s in zip(streams, state["streams"], strict=True):
                stream.load_state_dict(s)
        old.append((streams, state["pending"] if state else [], state["skips"]["counts"] if state else {}))
    generation = 1 + max(s.generation for streams, _, _ in old for s in streams)

    # Samples drawn but not trained on: (source, epoch, shard, record) -> their pending chunks.
    pending: dict[tuple[int, int, int, int], list[int]] = {}
    for streams, entries, _ in old:
        for source, epoch, index, chunk in entries:
            where = streams[source].locate([Position(epoch, index)])[0]
            pending.setdefault((source, *where), []).append(chunk)
    handed = [dict() for _ in range(new_count)]  # consumer -> {record: chunks}
    for i, record in enumerate(sorted(pending)):
        handed[i % new_count][record] = sorted(pending[record])

    # Per dataset: the epochs in progress, what each gave out, and the new consumers' plans for them.
    plans: list[list[dict[int, list[WorkItem]]]] = [[{} for _ in range(new_count)] for _ in urls]
    starts, sizes = [], []
    for source, shard_urls in enumerate(urls):
        streams = [s[source] for s, _, _ in old]
        known: dict[int, int] = {}
        for s in streams:
            known.update(s.sizes)
        sizes.append(known)
        first, last = min(s.epoch for s in streams), max(s.epoch for s in streams)
        if cfg.num_epochs is not None:
            first, last = min(first, cfg.num_epochs), min(last, cfg.num_epochs - 1)
        starts.append(first)
        for epoch in range(first, last + 1):
            given: dict[int, list[np.ndarray]] = {}
            for s in streams:
                for shard, records in s.consumed(epoch).items():
                    given.setdefault(shard, []).append(records)
            order = shard_order(seed, source, epoch, len(shard_urls), cfg.shuffle_shards)
            replanned = [s.plans[epoch] for s in streams if epoch in s.plans]
            if replanned:  # planned at an earlier layout change: only its shards had records left
                left = set()
                for items in replanned:
                    for item in items:
                        left.update(item.shards)
                        for shard, exclude in zip(item.shards, item.excludes):  # given out before that
                            given.setdefault(shard, []).append(exclude)
                order = [u for u in order if u in left]
            consumed = {u: np.unique(np.concatenate(parts)) for u, parts in given.items()}
            remaining = [u for u in order if u not in known or len(consumed.get(u, ())) < known[u]]
            for c, items in enumerate(_deal(remaining, consumed, new_count)):
                plans[source][c][epoch] = items

    states = []
    for consumer in consumers:
        c = consumer.index
        carried = [[] for _ in urls]
        added = []
        for (source, epoch, shard, index), chunks in handed[c].items():
            carried[source].append([epoch, shard, index])
            added += [[source, CARRIED, len(carried[source]) - 1, chunk] for chunk in chunks]
        streams = [{"epoch": starts[source], "emitted": 0, "num_shards": len(urls[source]),
                    "sizes": dict(sizes[source]), "generation": generation, "carried": carried[source],
                    "plans": {e: [item.to_state() for item in items] for e, items in plans[source][c].items()}}
                   for source in range(len(urls))]
        skips: dict[str, int] = {}
        if c == 0:
            for _, _, counts in old:
                for reason, n in counts.items():
                    skips[reason] = skips.get(reason, 0) + int(n)
        states.append({"consumer": [c, new_count], "streams": streams, "mixture": {"generation": generation},
                       "skips": {"counts": skips, "consecutive": 0}, "flushed": False, "packer": None,
                       "added_since": added, "returned_since": 0, "pending": added})
    return states
