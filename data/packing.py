"""Packing encoded samples into rows of the stage length (THD, one ``PackedBatch`` per row).

Each sample occupies its length rounded up to ``pad_multiple`` (2·CP, ×TP with sequence parallelism),
so context parallelism can cut every segment into 2·CP equal chunks. Rows are filled by
best-fit-decreasing over a buffer of samples, with two capacities: LLM tokens (``seq_length``) and ViT
patches (``max_patches``: ViT memory and time grow with patches, not with LLM tokens).

``OnlinePacker`` keeps a buffer of ``buffer_size`` samples. When it is full, it packs the buffer and
emits every row except the least filled one, whose samples stay for the next round (carrying a
partial row over is what keeps fill near offline BFD with a few hundred samples). A sample is carried
over at most ``max_carry_rounds`` times, which bounds how long any sample waits. Its decisions
depend only on the sequence of samples added (lengths, patch counts, order): no clock, no
randomness, so a resumed loader that replays the same samples gets the same rows.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from qwen3vl.data.batch import IGNORE_INDEX, PATCH_DIM, TEXT, PackedBatch
from qwen3vl.data.encoded_sample import EncodedSample
from qwen3vl.data.tokenizer import ENDOFTEXT


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def best_fit_decreasing(lengths: list[int], patches: list[int], capacity: int,
                        max_patches: int | None = None) -> list[list[int]]:
    """Groups of item indices (each group ascending) such that every group's lengths sum to at most
    ``capacity`` and its patches to at most ``max_patches``. Items are placed longest first (ties by
    index) into the open group that would be left with the least free length; a new group is opened
    when none fits. Groups are returned in the order they were opened."""
    if len(lengths) != len(patches):
        raise ValueError("best_fit_decreasing needs one patch count per length")
    limit = float("inf") if max_patches is None else max_patches
    for i, (n, p) in enumerate(zip(lengths, patches)):
        if n > capacity or p > limit:
            raise ValueError(f"item {i} (length {n}, patches {p}) exceeds capacity {capacity} / {max_patches}")
    free: list[int] = []
    free_patches: list[float] = []
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        best = -1
        for g in range(len(groups)):
            if lengths[i] <= free[g] and patches[i] <= free_patches[g] and (best < 0 or free[g] < free[best]):
                best = g
        if best < 0:
            groups.append([])
            free.append(capacity)
            free_patches.append(limit)
            best = len(groups) - 1
        groups[best].append(i)
        free[best] -= lengths[i]
        free_patches[best] -= patches[i]
    return [sorted(g) for g in groups]


def new_pixel_rows(num_patches: int) -> torch.Tensor:
    """Uninitialised [num_patches, PATCH_DIM] float32: where a row's patches are written (the default of
    ``build_row``; worker processes pass one that allocates in shared memory)."""
    return torch.empty(num_patches, PATCH_DIM, dtype=torch.float32)


def build_row(samples: list[EncodedSample], seq_length: int, pad_multiple: int = 1,
              pixel_rows: Callable[[int], torch.Tensor] = new_pixel_rows) -> PackedBatch:
    """One packed row: samples in the given order, each padded to ``pad_multiple``, then a tail
    segment (real length 0) when the row is not full. Padding holds <|endoftext|>, IGNORE labels,
    TEXT type and position 0. Each sample writes its patch rows straight into the row's pixel tensor
    (from ``pixel_rows``), the only time they are materialised."""
    if seq_length % pad_multiple:
        raise ValueError(f"seq_length {seq_length} must be a multiple of pad_multiple {pad_multiple}")
    real = [s.length for s in samples]
    padded = [padded_length(n, pad_multiple) for n in real]
    if sum(padded) > seq_length:
        raise ValueError(f"samples need {sum(padded)} padded tokens, the row has {seq_length}")
    if sum(padded) < seq_length:
        real.append(0)
        padded.append(seq_length - sum(padded))

    tokens = torch.full((seq_length,), ENDOFTEXT, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    types = torch.full((seq_length,), TEXT, dtype=torch.long)
    positions = torch.zeros(3, seq_length, dtype=torch.long)
    start = 0
    for s, size in zip(samples, padded):
        end = start + s.length
        tokens[start:end] = s.tokens
        labels[start:end] = s.labels
        types[start:end] = s.mm_token_type_ids
        positions[:, start:end] = s.position_ids
        start += size

    def cumulative(values: list[int]) -> torch.Tensor:
        return torch.tensor([0] + values, dtype=torch.int32).cumsum(0, dtype=torch.int32)

    loss_tokens = [s.num_loss_tokens for s in samples] + [0] * (len(real) - len(samples))
    pixels = pixel_rows(sum(s.num_patches for s in samples))
    rows, start = pixels.numpy(), 0
    for s in samples:
        s.write_pixels(rows[start:start + s.num_patches])
        start += s.num_patches
    grids = [s.grid_thw for s in samples if s.grid_thw.numel()]
    return PackedBatch(
        tokens=tokens, labels=labels, position_ids=positions, mm_token_type_ids=types,
        cu_seqlens=cumulative(real), cu_seqlens_padded=cumulative(padded),
        sample_loss_tokens=torch.tensor(loss_tokens, dtype=torch.long),
        pixel_values=pixels,
        grid_thw=torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long),
        pad_multiple=pad_multiple, samples=tuple(s.origin for s in samples if s.origin is not None),
    )


@dataclass
class PackingStats:
    rows: int = 0
    samples: int = 0
    real_tokens: int = 0  # tokens of packed samples (what the model trains on)
    row_tokens: int = 0  # rows × seq_length

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.row_tokens if self.row_tokens else 0.0


class OnlinePacker:
    """``add()`` encoded samples, take rows with ``pop_ready()``, and ``flush()`` at the end of the data.
    ``dropped`` counts samples that can never fit a row, by reason (``too_long_multimodal``,
    ``too_long_text``, ``too_many_patches``).

    A round decides several rows at once; ``pop_groups()`` / ``finish()`` + ``build()`` let a caller
    materialise them one at a time (the loader does, so only the row being handed out holds pixels)."""

    def __init__(self, seq_length: int, pad_multiple: int = 1, buffer_size: int = 256,
                 max_patches: int | None = None, max_carry_rounds: int = 4,
                 pixel_rows: Callable[[int], torch.Tensor] = new_pixel_rows):
        if seq_length % pad_multiple:
            raise ValueError(f"seq_length {seq_length} must be a multiple of pad_multiple {pad_multiple}")
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.seq_length = seq_length
        self.pad_multiple = pad_multiple
        self.buffer_size = buffer_size
        self.max_patches = max_patches
        self.max_carry_rounds = max_carry_rounds
        self.pixel_rows = pixel_rows
        self.dropped: Counter[str] = Counter()
        self.stats = PackingStats()
        self._buffer: list[EncodedSample] = []
        self._carried: list[int] = []  # rounds each buffered sample has already waited
        self._ready: list[list[EncodedSample]] = []  # rows decided, not built yet

    def __getstate__(self) -> dict:
        # The allocator belongs to the process running the packer, not to its state (see PackedStream).
        return {k: v for k, v in self.__dict__.items() if k != "pixel_rows"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, pixel_rows=new_pixel_rows)

    def add(self, sample: EncodedSample) -> None:
        reason = self._reject_reason(sample)
        if reason:
            self.dropped[reason] += 1
            return
        self._buffer.append(sample)
        self._carried.append(0)
        if len(self._buffer) >= self.buffer_size:
            self._pack(keep_last=True)

    def pop_ready(self) -> list[PackedBatch]:
        return [self.build(group) for group in self.pop_groups()]

    def pop_groups(self) -> list[list[EncodedSample]]:
        """The samples of each row decided so far, in order, not built yet (see ``build``)."""
        ready, self._ready = self._ready, []
        return ready

    def finish(self) -> None:
        """End of the data: decides rows for everything still buffered."""
        self._pack(keep_last=False)

    def flush(self) -> list[PackedBatch]:
        """Packs everything still buffered (end of data) and returns all ready rows."""
        self.finish()
        return self.pop_ready()

    def build(self, group: list[EncodedSample]) -> PackedBatch:
        return build_row(group, self.seq_length, self.pad_multiple, self.pixel_rows)

    @property
    def buffered(self) -> list[EncodedSample]:
        """The samples waiting for a row, in arrival order."""
        return list(self._buffer)

    def __len__(self) -> int:
        return len(self._buffer)

    def _reject_reason(self, sample: EncodedSample) -> str | None:
        if padded_length(sample.length, self.pad_multiple) > self.seq_length:
            return "too_long_multimodal" if sample.is_multimodal else "too_long_text"
        if self.max_patches is not None and sample.num_patches > self.max_patches:
            return "too_many_patches"
        return None

    def _pack(self, keep_last: bool) -> None:
        if not self._buffer:
            return
        lengths = [padded_length(s.length, self.pad_multiple) for s in self._buffer]
        groups = best_fit_decreasing(lengths, [s.num_patches for s in self._buffer], self.seq_length,
                                     self.max_patches)
        kept: list[int] = []
        if keep_last and len(groups) > 1:
            # The least filled row waits for more samples (ties: the one opened last).
            fill = [sum(lengths[i] for i in g) for g in groups]
            worst = min(range(len(groups)), key=lambda g: (fill[g], -g))
            if all(self._carried[i] < self.max_carry_rounds for i in groups[worst]):
                kept = groups.pop(worst)
        for group in groups:
            row = [self._buffer[i] for i in group]
            self._ready.append(row)
            self.stats.rows += 1
            self.stats.samples += len(row)
            self.stats.real_tokens += sum(s.length for s in row)
            self.stats.row_tokens += self.seq_length
        self._buffer = [self._buffer[i] for i in kept]
        self._carried = [self._carried[i] + 1 for i in kept]
