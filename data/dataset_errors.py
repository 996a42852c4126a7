"""Dataset-level failures: a whole dataset, not one sample, cannot feed the run.

A bad sample is skipped and counted (qwen3vl.data.robust); a dataset that gives a consumer no readable
sample in a whole epoch is another matter: training would silently go on without it, or a stream
would spin through empty epochs. When a consumer (a data-parallel rank × loader worker) reaches the
end of such an epoch, the dataset's shards are checked once, in their listed order, each until its
first readable sample:

* none is readable: ``EmptyDatasetError``, naming the dataset, its shard pattern, how many shards
  failed by which reason and the first of them. Every consumer reaches the same verdict from the
  same files, so every rank reports the same message. ``on_empty_dataset="drop"`` instead takes the
  dataset out of the mixture (qwen3vl.data.packed_stream);
* some are: only this consumer's share is empty or broken (fewer samples than consumers, or all of
  its shards broken): ``DatasetError`` with what to change. No policy drops that: the mixture would
  differ from consumer to consumer.

The check reads shards only on this failure path, and stops at the first readable sample.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from qwen3vl.data.shards import SkippedRecord, read_shard

ON_EMPTY_DATASET = ("stop", "drop")  # what a dataset without a readable shard does (docs/data_format.md)


class DatasetError(RuntimeError):
    """A dataset cannot feed the run; the message names it (its configured name) and the cause."""

    def __init__(self, summary: str, dataset: str | None = None, fix: str = ""):
        super().__init__(f"{summary}; {fix}" if fix else summary)
        self.summary, self.dataset, self.fix = summary, dataset, fix

    def __reduce__(self):  # crosses from loader workers to the trainer
        return type(self), (self.summary, self.dataset, self.fix)


class EmptyDatasetError(DatasetError):
    """No shard of the dataset holds a readable sample."""


@dataclass(frozen=True)
class ShardVerdict:
    url: str
    reason: str | None  # None: the shard gave a readable sample
    message: str = ""


def check_shard(url: str) -> ShardVerdict:
    """Whether ``url`` gives at least one readable sample; else the reason of its last failure."""
    last: SkippedRecord | None = None
    for record in read_shard(url):
        if not isinstance(record, SkippedRecord):
            return ShardVerdict(url, None)
        last = record
    if last is None:
        return ShardVerdict(url, "empty_shard", "the tar holds no sample")
    return ShardVerdict(url, last.reason, last.message)


def check_shards(urls: Sequence[str]) -> tuple[list[ShardVerdict], bool]:
    """(verdicts of the failed shards, whether a readable shard was found); stops at the first readable one."""
    failed = []
    for url in urls:
        verdict = check_shard(url)
        if verdict.reason is None:
            return failed, True
        failed.append(verdict)
    return failed, False


def describe_failures(failed: Sequence[ShardVerdict]) -> str:
    """'1 shard skipped as truncated_tar (first: URL: why)' / '3 shards skipped: 2 as a, 1 as b (first: ...)'."""
    counts = Counter(v.reason for v in failed)
    noun = "shard" if len(failed) == 1 else "shards"
    if len(counts) == 1:
        how = f"{len(failed)} {noun} skipped as {failed[0].reason}"
    else:
        how = f"{len(failed)} {noun} skipped: " + ", ".join(f"{n} as {r}" for r, n in counts.most_common())
    return f"{how} (first: {failed[0].url}: {failed[0].message})"


def unreadable_epoch_error(name: str, pattern: str, urls: Sequence[str], own_urls: Sequence[str], epoch: int,
                           consumer: str, emitted: int) -> DatasetError:
    """The error for a consumer whose ``epoch`` of dataset ``name`` gave no readable sample."""
    where = f"dataset {name!r} (shards {pattern})"
    failed, readable = check_shards(urls)
    if not readable:
        return EmptyDatasetError(
            f"{where}: no readable sample in epoch {epoch} — {describe_failures(failed)}", name,
            "fix or rebuild its shards, leave it out of data.datasets, or set data.on_empty_dataset=drop to "
            "train on the other datasets")
    if emitted == 0:
        return DatasetError(
            f"{where}: {consumer} got no sample in epoch {epoch}: the dataset holds fewer samples than "
            "there are consumers", name, "add data or use fewer loader workers")
    own_failed, _ = check_shards(own_urls)
    cause = describe_failures(own_failed) if own_failed else "every sample of its share was skipped"
    return DatasetError(
        f"{where}: {consumer} got no readable sample in epoch {epoch} — {cause}; other shards of the "
        "dataset are readable", name, "fix or remove the broken shards, or use fewer loader workers")
