"""Bad input never kills a run and is never silent.

Every skipped sample gives one log line naming its shard, key and reason, and is counted by reason.
A run of ``max_consecutive_failures`` skips in a row stops with ``TooManyBadSamples``: that is not bad
luck but a broken dataset or pipeline (a wrong image root, a shard of another format), and training
on what is left would be silently wrong. One good sample resets the run.

``SKIP_REASONS`` is every reason a count can have, in a fixed order, so that the counts of all
data-parallel ranks can be summed as one vector (``skip_vector`` / ``skip_counts``) inside a
reduction the trainer does anyway.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping, Sequence

from qwen3vl.data.sample_format import REASONS
from qwen3vl.data.shards import SHARD_REASONS

logger = logging.getLogger("qwen3vl.data")
# "undecodable": a medium the decoder raised on; "empty_dataset": a dataset dropped from the mixture
# (data.on_empty_dataset=drop), counted once per dataset; "other": any reason not listed here.
SKIP_REASONS = (*REASONS, *SHARD_REASONS, "undecodable", "empty_dataset", "other")


def skip_vector(counts: Mapping[str, int]) -> list[float]:
    """Counts by reason as a vector over ``SKIP_REASONS`` (unknown reasons go to "other")."""
    vector = [0.0] * len(SKIP_REASONS)
    for reason, n in counts.items():
        index = SKIP_REASONS.index(reason) if reason in SKIP_REASONS else len(SKIP_REASONS) - 1
        vector[index] += n
    return vector


def skip_counts(vector: Sequence[float]) -> dict[str, int]:
    """The inverse of ``skip_vector``: the non-zero counts by reason."""
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, vector, strict=True) if n}


class TooManyBadSamples(RuntimeError):
    pass


class SkipTracker:
    def __init__(self, max_consecutive_failures: int = 100):
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {max_consecutive_failures}")
        self.max_consecutive_failures = max_consecutive_failures
        self.counts: Counter[str] = Counter()
        self.consecutive = 0

    def skip(self, shard: str, key: str, reason: str, message: str) -> None:
        self.counts[reason] += 1
        self.consecutive += 1
        logger.warning("skipped sample: shard=%s key=%s reason=%s: %s", shard, key or "?", reason, message)
        if self.consecutive >= self.max_consecutive_failures:
            raise TooManyBadSamples(
                f"{self.consecutive} consecutive samples failed (last: shard={shard} key={key} reason={reason}: "
                f"{message}); skipped so far by reason: {dict(self.counts)}. The data is likely broken or "
                "mis-configured (paths, image root, shard format); fix it, or raise "
                "max_consecutive_failures if this many bad samples in a row is expected")

    def count(self, reason: str) -> None:
        """Counts an event that is not a bad sample (no log line, no effect on the consecutive run)."""
        self.counts[reason] += 1

    def success(self) -> None:
        self.consecutive = 0

    def skipped_counts(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.consecutive = int(state["consecutive"])
