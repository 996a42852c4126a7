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
* ``shared_rows`` (loader worker processes): shared memory, as torch's DataLoader allocates its
  batches in workers, so handing the row to the trainer copies nothing.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from qwen3vl.data.batch import PATCH_DIM

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
            # Some slack: rows of one stream have similar patch counts, and a row slightly larger than
            # the largest so far should not need a new buffer.
            size = num_patches + num_patches // 8 + 1
            if self.max_patches is not None and num_patches <= self.max_patches <= size + size // 3:
                size = self.max_patches
            buffer = np.empty((size, PATCH_DIM), dtype=np.float32)
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
