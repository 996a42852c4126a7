"""Row pixel memory: a pooled buffer is handed out again only once no tensor or view refers to it."""
import gc

from qwen3vl.data.pixel_memory import ReusedRows


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
