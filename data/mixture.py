"""A weighted mixture of datasets: which source the next sample comes from.

Weights are sample proportions (a caption and a long document count one each). Draws come from a
seeded numpy generator whose state is the mixture's whole state, so a restored mixture continues
with the same choices. A source that runs out (finite ``num_epochs``) leaves the mixture and the
remaining weights are renormalised. After a change of layout every consumer's mixture starts afresh
from a seed that includes the number of layout changes (``{"generation": g}`` as its state).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class WeightedMixture:
    def __init__(self, weights: Sequence[float], seed: int, stream_id: int = 0):
        weights = [float(w) for w in weights]
        if not weights or any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0; got {weights}")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.active = np.asarray([w > 0 for w in weights])
        # One generator per consumer: each (rank, worker) draws its own independent sequence.
        self.seed, self.stream_id = seed, stream_id
        self._rng = self._generator(0)

    def _generator(self, generation: int) -> np.random.Generator:
        words = [self.seed, self.stream_id, 0x313A] + ([generation] if generation else [])
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))

    @property
    def exhausted(self) -> bool:
        return not bool(self.active.any())

    def next_source(self) -> int:
        if self.exhausted:
            raise StopIteration
        w = np.where(self.active, self.weights, 0.0)
        cumulative = np.cumsum(w / w.sum())
        index = int(np.searchsorted(cumulative, self._rng.random(), side="right"))
        # Guard the float edge (draw == 1 - eps beyond the last cumulative value).
        return min(index, int(np.flatnonzero(self.active)[-1]))

    def retire(self, source: int) -> None:
        self.active[source] = False

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state, "active": self.active.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "generation" in state:  # a fresh start after a change of layout
            self._rng = self._generator(int(state["generation"]))
            return
        self._rng.bit_generator.state = state["rng"]
        self.active = np.asarray(state["active"], dtype=bool)
