"""Rank × worker assignment (no duplicate, no gap), seeded shuffling, epochs and exact stream state."""
from collections import Counter

import numpy as np
import pytest

from qwen3vl.data.shards import ShardWriter, expand_shards
from qwen3vl.data.stream import Consumer, ShardStream, WorkItem


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    with ShardWriter(out, "s", max_samples=7) as writer:  # 50 samples in 8 shards, the last one short
        for i in range(50):
            writer.write(f"k{i:03d}", {"kind": "text", "text": f"doc {i}"})
    return expand_shards(str(out))


def keys(stream):
    return [record.key for _, record in stream]


@pytest.mark.parametrize("dp_size,num_workers", [(1, 1), (2, 2), (4, 2), (3, 5), (8, 4)])
def test_every_sample_once_per_epoch_over_ranks_and_workers(urls, dp_size, num_workers):
    """Counts keys over all (rank, worker); (3, 5) and (8, 4) have fewer shards than consumers."""
    count = dp_size * num_workers
    seen = Counter()
    for rank in range(dp_size):
        for worker in range(num_workers):
            consumer = Consumer(rank * num_workers + worker, count)
            seen.update(keys(ShardStream(urls, consumer, seed=5, shuffle_buffer=4, num_epochs=2)))
    assert sorted(seen) == [f"k{i:03d}" for i in range(50)]
    assert set(seen.values()) == {2}  # two epochs: each key exactly twice


def test_shuffling_is_seeded_and_changes_per_epoch(urls):
    one_epoch = lambda seed, epochs=1: keys(ShardStream(urls, Consumer(), seed=seed, shuffle_buffer=10,
                                                        num_epochs=epochs))
    assert one_epoch(1) == one_epoch(1)
    assert one_epoch(1) != one_epoch(2)
    two = one_epoch(1, epochs=2)
    assert sorted(two[:50]) == sorted(two[50:]) and two[:50] != two[50:]
    assert one_epoch(1) != sorted(one_epoch(1))  # samples really are shuffled
    unshuffled = ShardStream(urls, Consumer(), seed=1, shuffle_buffer=1, shuffle_shards=False, num_epochs=1)
    assert keys(unshuffled) == [f"k{i:03d}" for i in range(50)]


@pytest.mark.parametrize("consumer", [Consumer(1, 3), Consumer(5, 12)])  # by shard, by sample
def test_restored_stream_continues_exactly(urls, consumer):
    make = lambda: ShardStream(urls, consumer, seed=3, shuffle_buffer=4, num_epochs=3)
    full = [(p, r.key) for p, r in make()]
    for k in range(0, len(full), 3):
        stream = make()
        for _ in range(k):
            next(stream)
        restored = make()
        restored.load_state_dict(stream.state_dict())
        assert [(p, r.key) for p, r in restored] == full[k:]
        earlier = [p for p, _ in full[:k]][::-1]
        assert [r.key for r in restored.read_at(earlier)] == [key for _, key in full[:k]][::-1]


def test_empty_assignment_is_an_error(tmp_path):
    with ShardWriter(tmp_path, "e", max_samples=1) as writer:
        writer.write("only", {"kind": "text", "text": "x"})
    stream = ShardStream(expand_shards(str(tmp_path)), Consumer(1, 2), seed=0)
    with pytest.raises(RuntimeError, match="got no sample"):
        next(stream)


def shard_and_record(key: str) -> tuple[int, int]:
    i = int(key[1:])  # written in order, 7 to a shard
    return i // 7, i % 7


@pytest.mark.parametrize("consumer", [Consumer(1, 3), Consumer(5, 12)])  # by shard, one item over all shards
def test_positions_map_back_to_their_shard_and_record(urls, consumer):
    """What re-partitioning relies on: ``locate`` and ``consumed`` say exactly which records were emitted,
    mid-block, across an epoch boundary and for a plan that excludes records already consumed."""
    make = lambda: ShardStream(urls, consumer, seed=3, shuffle_buffer=4, num_epochs=3)
    stream = make()
    emitted = [(p, shard_and_record(r.key)) for p, r in (next(stream) for _ in range(9))]
    assert [(p.epoch, *where) for p, where in emitted] == stream.locate([p for p, _ in emitted])
    for epoch in (0, 1):
        got = {(u, int(i)) for u, records in stream.consumed(epoch).items() for i in records}
        assert got == {where for p, where in emitted if p.epoch == epoch}
    # A plan that excludes some records of every shard emits exactly the others.
    excluded = {u: np.array([0, 3], dtype=np.int64) for u in range(len(urls))}
    planned = make()
    planned.plans = {0: [WorkItem((u,), excludes=(excluded[u],)) for u in (2, 5)]}
    out = []
    for p, r in planned:
        if p.epoch != 0:
            break
        out.append(shard_and_record(r.key))
    assert sorted(out) == sorted((u, i) for u in (2, 5) for i in range(7) if i not in (0, 3))
