"""A held-out set for evaluation: the same packed rows every time, whatever the layout and the run's state.

``EvalSet(spec, base, seq_length=..., pad_multiple=...)`` reads one dataset as a single consumer
(``Consumer(0, 1)``: the shard assignment never depends on the DP size), its shards in file order and
its samples in shard order (no shuffle: ``shuffle_buffer=1``, ``shuffle_shards=False``), one pass
(``num_epochs=1``), limited to the first ``samples`` raw samples or the first ``tokens`` encoded tokens.
The rows are packed like training (the run's ``PackedStream``: encoder, packer and its buffer, at the
stage's length), with a seed of their own (``EVAL_SEED``: nothing is drawn from it without shuffling,
but the order can never follow ``train.seed``). Nothing here touches the training loader or its state.

``rows(keep)`` rebuilds the pass on every call (deterministic, so identical) rather than holding the
rows: a held-out set of real images is too large to keep in memory for the whole run. Every rank reads
the whole pass (the packer must see every sample to decide the rows) and keeps only the rows ``keep``
selects, building just those rows' pixels once more is not needed: ``PackedStream`` builds a row only
when it is drawn, so the others are dropped as soon as they are made. Row ``i`` of the pass is the same
samples under every layout; only the alignment padding of each segment follows the layout's
``pad_multiple`` (which never changes a loss: padding has no target and is never attended to).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from qwen3vl.data.batch import PackedBatch
from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.loader import DatasetSpec, LoaderConfig
from qwen3vl.data.packed_stream import PackedStream
from qwen3vl.data.shards import check_shards_exist, expand_shards
from qwen3vl.data.stream import Consumer
from qwen3vl.data.tokenizer import load_tokenizer

EVAL_SEED = 0


class EvalSet:
    def __init__(self, spec: DatasetSpec, base: LoaderConfig, *, seq_length: int, pad_multiple: int,
                 samples: int | None = None, tokens: int | None = None) -> None:
        """``base``: the training loader's config, for the packing and processing settings (its datasets
        and shuffling are not used). ``samples`` / ``tokens``: the pass's limit; both None: every sample."""
        self.name = spec.name
        self.cfg = replace(base, datasets=[DatasetSpec(spec.path, 1.0, spec.name)], shuffle_buffer=1,
                           shuffle_shards=False, num_epochs=1, on_empty_dataset="stop")
        self.seq_length, self.pad_multiple, self.samples, self.tokens = seq_length, pad_multiple, samples, tokens
        self.urls = [expand_shards(spec.path)]
        check_shards_exist(self.urls[0])
        self.encoder = SampleEncoder(load_tokenizer(self.cfg.tokenizer_path),
                                     replace(self.cfg.processing, seq_length=seq_length))

    def rows(self, keep: Callable[[int], bool] = lambda index: True) -> tuple[int, list[tuple[int, PackedBatch]]]:
        """(rows in the whole pass, (index, row) of the rows whose index ``keep`` accepts, in order)."""
        stream = PackedStream(self.cfg, self.urls, seq_length=self.seq_length, pad_multiple=self.pad_multiple,
                              consumer=Consumer(0, 1), seed=EVAL_SEED, encoder=self.encoder,
                              max_samples=self.samples, max_tokens=self.tokens)
        kept, count = [], 0
        for count, row in enumerate(stream, start=1):
            if keep(count - 1):
                kept.append((count - 1, row))
        return count, kept
