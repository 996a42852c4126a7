"""Row pixel memory: a pooled buffer is handed out again only once no tensor or view refers to it, in the
loader's own process and across its worker processes."""
import gc

import torch

from qwen3vl.data.demo import write_demo
from qwen3vl.data.loader import LoaderConfig, build_loader
from qwen3vl.data.pixel_memory import ReusedRows, SharedRowPool, released_when_unused


def test_a_buffer_is_reused_only_when_nothing_refers_to_it():
    pool = ReusedRows(max_free=2)
    row = pool(100)
    address = row.data_ptr()
    view, array = row[10:20], row.numpy()
    del row
    assert pool(100).data_ptr() != address  # a view of the row is alive
    del view
    assert pool(100).data_ptr() != address  # a numpy array over the row is alive
    del array
    gc.collect()
    reused = pool(90)
    assert reused.data_ptr() == address and tuple(reused.shape) == (90, 1536)
    assert pool(1000).data_ptr() != address  # does not fit: a new buffer


def test_idle_buffers_are_bounded():
    pool = ReusedRows(max_free=2)
    rows = [pool(n) for n in (10, 20, 30, 40, 50)]
    assert len(pool) == 5  # all in use at once
    del rows
    for n in (60, 70, 80):  # larger than every idle buffer: the smallest idle ones are given back
        pool(n)
    assert len(pool) <= 2 + 1


def test_a_buffer_near_the_row_limit_is_made_as_large_as_the_limit():
    pool = ReusedRows(max_patches=1000)
    first = pool(800)  # within a quarter of the limit: the limit's size, so that no later row needs more
    assert tuple(first.shape) == (800, 1536)
    address = first.data_ptr()
    del first
    assert pool(1000).data_ptr() == address and len(pool) == 1
    small = ReusedRows(max_patches=1000)
    row = small(100)  # far from it: the usual slack only
    del row
    small(1000)
    assert len(small) == 2


def test_a_shared_slot_is_handed_out_again_only_once_the_trainer_is_done_with_it():
    free = torch.ones(2, dtype=torch.uint8).share_memory_()
    pool = SharedRowPool(free)
    first = pool(100)
    slot, address = pool.slot(first), first.data_ptr()
    assert slot is not None and free[slot] == 0
    received = released_when_unused(first, free, slot)  # what the trainer's process holds of it
    view = received[10:20]
    del first, received
    second = pool(100)
    assert pool.slot(second) not in (None, slot)  # a view of the first row is alive: the other slot
    outside = pool(100)
    assert pool.slot(outside) is None and outside.is_shared()  # both slots busy: fresh memory, no wait
    assert free[slot] == 0
    del view
    gc.collect()
    assert free[slot] == 1
    again = pool(90)
    assert pool.slot(again) == slot and again.data_ptr() == address and tuple(again.shape) == (90, 1536)
    assert pool.slot(pool(0)) is None  # a row without pixels takes no slot


def test_a_free_slot_too_small_for_a_row_is_made_larger():
    free = torch.ones(1, dtype=torch.uint8).share_memory_()
    pool = SharedRowPool(free)
    small = pool(10)
    free[pool.slot(small)] = 1  # the trainer is done with it
    large = pool(1000)
    assert pool.slot(large) == 0 and tuple(large.shape) == (1000, 1536)


def test_rows_from_a_worker_stay_intact_while_held_and_reuse_its_slots_once_dropped(tmp_path):
    subsets = write_demo(tmp_path, seed=4, captions=120, videos=0, interleaved=0, texts=0,
                         samples_per_shard=8)["subsets"]
    cfg = LoaderConfig(datasets=[(subsets["caption"]["pattern"], 1.0)], shuffle_buffer=5, pack_buffer=6,
                       num_epochs=1, prefetch=2)
    slots = cfg.prefetch + 3

    held, copies = [], []  # the trainer keeps every row: the worker runs out of slots and must not reuse one
    for batch in build_loader(cfg, 512, num_workers=1, seed=7):
        held.append(batch)
        copies.append(batch.pixel_values.clone())
    assert len(held) > 2 * slots
    for batch, copy in zip(held, copies, strict=True):
        assert torch.equal(batch.pixel_values, copy)
    # A row in a slot reaches the trainer as a tensor over the worker's memory that it gives back when
    # dropped (not itself a shared storage); a row outside the pool as the shared storage itself.
    assert sum(not b.pixel_values.is_shared() for b in held) <= slots

    dropped = []  # the trainer drops each row after use, as the training loop does: the slots come back
    for batch in build_loader(cfg, 512, num_workers=1, seed=7):
        dropped.append((batch.pixel_values.clone(), not batch.pixel_values.is_shared()))
        del batch
    assert len(dropped) == len(copies)
    assert all(torch.equal(pixels, copy) for (pixels, _), copy in zip(dropped, copies))
    assert all(pooled for _, pooled in dropped)
