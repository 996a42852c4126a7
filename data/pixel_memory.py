"""Where a packed row's pixel tensor lives: memory that is written once and never copied again.

A row of image samples carries ~100+ MB of float32 patches. Fresh memory of that size costs page
faults on first touch (the kernel maps and zeroes every 4 kB page); measured on a 2-core VM it halved
the caption throughput of the loader (docs/benchmarks.md). So rows are written into memory that is
already mapped, chosen by where the row goes next:

* ``ReusedRows`` (the loader in the training process, no GPU): a small pool of pageable buffers. A
  buffer is handed out again only when no tensor refers to it any more: each row's tensor is made with
  ``torch.from_numpy``, whose storage holds a Python reference to the pool's array until the last view
  of the row is gone, so the array's reference count says exactly when it is free.
* ``pinned_rows`` (the loader in the training process, with a GPU): page-locked memory from torch's
  caching host allocator, which recycles blocks itself (after the copies that read them finished);
  the host-to-device copy then runs asynchronously and the row is written only once.
* ``SharedRowPool`` (loader worker processes): shared memory, as torch's DataLoader allocates its
  batches in workers, so handing the row to the trainer copies nothing; but reused. Fresh shared memory
  is zeroed page by page on first touch, and a worker writing every row into fresh memory built caption
  rows at 0.43 of the in-process rate (benchmarks/loader_workers_bench.py, docs/benchmarks.md). The
  trainer's process marks a slot free once nothing refers to the row it received
  (``released_when_unused``); the worker hands out only free slots.
"""
from __future__ import annotations

import sys
import weakref

import numpy as np
import torch

from qwen3vl.data.batch import PATCH_DIM

def buffer_patches(num_patches: int, max_patches: int | None) -> int:
    """How many patches a new pooled buffer for a row of ``num_patches`` holds."""
    # Some slack: rows of one stream have similar patch counts, and a row slightly larger than the largest
    # so far should not need a new buffer. Within a quarter of the row limit: the limit itself.
    size = num_patches + num_patches // 8 + 1
    if max_patches is not None and num_patches <= max_patches <= size + size // 3:
        size = max_patches
    return size


class ReusedRows:
    """``rows(n) -> [n, PATCH_DIM] float32`` from reused pageable buffers (see the module docstring)."""

    def __init__(self, max_free: int = 4, max_patches: int | None = None):
        self.max_free = max_free  # free buffers kept for reuse; beyond that they are released
        # The most patches a row can have (its tokens, or the packer's patch cap): a buffer within a quarter
        # of it is made that large, so a stream of picture-heavy rows maps its memory once, not again each
        # time a row is a little larger than any before (measured: 0.34 s of page faults for one 200 MB
        # buffer on a 2-core VM, a tenth of a 64-row caption benchmark).
        self.max_patches = max_patches
        self._buffers: list[np.ndarray] = []

    def _is_free(self, index: int) -> bool:
        # References when no row uses it: the pool's list and getrefcount's own argument.
        return sys.getrefcount(self._buffers[index]) == 2

    def __call__(self, num_patches: int) -> torch.Tensor:
        free = [i for i in range(len(self._buffers)) if self._is_free(i)]
        fitting = [i for i in free if self._buffers[i].shape[0] >= num_patches]
        if fitting:
            buffer = self._buffers[min(fitting, key=lambda i: self._buffers[i].shape[0])]
        else:
            # Too many idle ones (none of which fits): give the smallest back.
            idle = sorted(free, key=lambda i: self._buffers[i].shape[0])[:max(0, len(free) - self.max_free + 1)]
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in idle]
            buffer = np.empty((buffer_patches(num_patches, self.max_patches), PATCH_DIM), dtype=np.float32)
            self._buffers.append(buffer)
        return torch.from_numpy(buffer[:num_patches])

    def __len__(self) -> int:
        return len(self._buffers)


def pinned_rows(num_patches: int) -> torch.Tensor:
    return torch.empty(num_patches, PATCH_DIM, dtype=torch.float32, pin_memory=True)


def shared_rows(num_patches: int) -> torch.Tensor:
    # UntypedStorage._new_shared is what torch.utils.data's default_collate uses in workers for this.
    storage = torch.UntypedStorage._new_shared(num_patches * PATCH_DIM * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage).view(num_patches, PATCH_DIM)


class SharedRowPool:
    """``rows(n) -> [n, PATCH_DIM] float32`` in a loader worker, from shared-memory slots that the trainer's
    process gives back (see the module docstring).

    ``free``: one shared uint8 flag a slot (1: free), made by the trainer's process and passed to the
    worker; the worker clears a flag when it hands the slot out, the trainer sets it when the row is
    unused (``released_when_unused``), so each flag has one writer per transition. When every slot is
    still in the trainer's hands (it holds more rows than there are slots) a row gets fresh shared memory
    outside the pool: slower, never waiting.
    """

    def __init__(self, free: torch.Tensor, max_patches: int | None = None):
        self.free = free.numpy()
        self.max_patches = max_patches
        self._buffers: list[torch.Tensor | None] = [None] * len(self.free)

    def __call__(self, num_patches: int) -> torch.Tensor:
        if num_patches == 0:  # nothing to map
            return shared_rows(0)
        ready = [i for i, b in enumerate(self._buffers) if b is not None and self.free[i]]
        fitting = [i for i in ready if self._buffers[i].shape[0] >= num_patches]
        if fitting:
            slot = min(fitting, key=lambda i: self._buffers[i].shape[0])
        else:
            unused = [i for i, b in enumerate(self._buffers) if b is None]
            if not unused and not ready:
                return shared_rows(num_patches)
            # A slot never used, else the smallest free one, made large enough.
            slot = unused[0] if unused else min(ready, key=lambda i: self._buffers[i].shape[0])
            self._buffers[slot] = shared_rows(buffer_patches(num_patches, self.max_patches))
        self.free[slot] = 0
        return self._buffers[slot][:num_patches]

    def slot(self, rows: torch.Tensor) -> int | None:
        """The slot ``rows`` (a tensor this pool handed out) lives in; None for memory outside the pool."""
        if rows.numel() == 0:
            return None
        address = rows.untyped_storage().data_ptr()
        return next((i for i, b in enumerate(self._buffers)
                     if b is not None and b.untyped_storage().data_ptr() == address), None)


def released_when_unused(rows: torch.Tensor, free: torch.Tensor, slot: int) -> torch.Tensor:
    """``rows`` (received from a worker's ``SharedRowPool`` slot ``slot``) as a tensor that sets
    ``free[slot]`` once neither it nor any view or numpy array of it is left."""
    # The same trick as ReusedRows: torch.from_numpy's storage holds the array until its last view is
    # gone; the array holds ``rows``. A finalizer on the array then says exactly when the slot is free.
    array = rows.numpy()
    flags = free.numpy()
    finalizer = weakref.finalize(array, flags.__setitem__, slot, 1)
    finalizer.atexit = False  # at exit nobody reads the flags any more
    return torch.from_numpy(array)
