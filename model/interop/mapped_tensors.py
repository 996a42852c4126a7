"""The tensors of one side of a weight table, made on demand from the other side, one mapping at a time.

A conversion never holds more than the mappings in flight: asking for a name reads the source tensors of
its mapping, applies the transform, and keeps the outputs of the last few mappings (a layer's experts or
the two halves of a SwiGLU weight are asked for one after another). Thread-safe, so several writer
threads can share one instance.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.interop.weight_table import Mapping

Reader = Callable[[Sequence[str]], Sequence[torch.Tensor]]


class MappedTensors:
    """``direction="ours"``: our names from theirs (HF -> mcore); ``"theirs"``: the reverse."""

    def __init__(self, mappings: Sequence[Mapping], read: Reader, config: Qwen3VLConfig,
                 direction: str = "ours", keep: int = 2) -> None:
        if direction not in ("ours", "theirs"):
            raise ValueError(f"direction must be 'ours' or 'theirs', not {direction!r}")
        self.mappings = list(mappings)
        self.config = config
        self._read = read
        self._ours = direction == "ours"
        self._index = {name: k for k, m in enumerate(self.mappings) for name in self._outputs_of(m)}
        self._keep = max(1, keep)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._busy: dict[int, threading.Lock] = {}

    def _outputs_of(self, m: Mapping) -> tuple[str, ...]:
        return m.ours if self._ours else m.theirs

    def _inputs_of(self, m: Mapping) -> tuple[str, ...]:
        return m.theirs if self._ours else m.ours

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """The names made together (one mapping each), in table order."""
        return [self._outputs_of(m) for m in self.mappings]

    @property
    def sources(self) -> list[str]:
        """Every name read from the other side."""
        return [name for m in self.mappings for name in self._inputs_of(m)]

    def make(self, group: Sequence[str]) -> list[torch.Tensor]:
        """The tensors of one whole group (not cached: for writers that use each once)."""
        outputs = self._make(self._index[group[0]])
        return [outputs[name] for name in group]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, from the cache of recent mappings when it is there."""
        k = self._index[name]
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k][name]
            busy = self._busy.setdefault(k, threading.Lock())
        with busy:  # a second thread asking for the same mapping waits for the first
            with self._lock:
                if k in self._cache:
                    return self._cache[k][name]
            outputs = self._make(k)
            with self._lock:
                self._cache[k] = outputs
                while len(self._cache) > self._keep:
                    self._cache.popitem(last=False)
                self._busy.pop(k, None)
        return outputs[name]

    def _make(self, k: int) -> dict[str, torch.Tensor]:
        m = self.mappings[k]
        inputs = list(self._read(self._inputs_of(m)))
        transform = m.transform.to_ours if self._ours else m.transform.to_theirs
        return dict(zip(self._outputs_of(m), transform(inputs, self.config)))
