"""Datasets that fail as a whole, and shards that break while a run reads them.

A dataset without a readable shard stops the loader of every consumer with one message naming the
dataset, its pattern and the cause (or, with on_empty_dataset=drop, leaves the mixture); shards
truncated, replaced by garbage or deleted mid-run, inside an epoch or between two, are skipped and
counted by reason while the loader goes on. On 2 gloo ranks through the trainer, the skips of both
ranks reach metrics.jsonl and the run finishes. All through ``build_loader``/``train``, on real files.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path

import pytest

from qwen3vl.data.dataset_errors import DatasetError, EmptyDatasetError
from qwen3vl.data.loader import DatasetSpec, LoaderConfig, build_loader
from qwen3vl.data.shards import ShardWriter
from qwen3vl_testing.distributed import run_distributed

TEXT = "A red circle in the top left."


def write_text_shards(folder: Path, prefix: str, shards: int, per_shard: int) -> list[Path]:
    with ShardWriter(folder, prefix, max_samples=per_shard) as writer:
        for i in range(shards * per_shard):
            writer.write(f"{prefix}{i:04d}", {"kind": "text", "text": f"{TEXT} Document {i}."})
    return writer.paths


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def truncate(path: Path) -> None:
    """Cuts the shard inside the data of its middle member (tar's zero padding at the end would not do)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    os.truncate(path, members[len(members) // 2].offset_data + 1)


def loader_for(datasets, dp_rank=0, dp_size=1, **kw):
    cfg = LoaderConfig(datasets=datasets, shuffle_buffer=1, pack_buffer=2, **kw)
    return build_loader(cfg, seq_length=128, dp_rank=dp_rank, dp_size=dp_size)


def draw(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.fixture
def mix(tmp_path):
    """A good dataset and a 'bad' one whose two shards are garbage and gone (after the start check)."""
    write_text_shards(tmp_path / "good", "good", shards=4, per_shard=4)
    bad = write_text_shards(tmp_path / "bad", "bad", shards=2, per_shard=4)
    return tmp_path, bad


def test_a_dataset_without_a_readable_shard_stops_every_consumer_with_one_message(mix):
    root, bad = mix
    datasets = [DatasetSpec(str(root / "good"), 1.0, "good"),
                DatasetSpec(str(root / "bad" / "bad-{000000..000001}.tar"), 1.0, "bad")]
    loaders = [loader_for(datasets, dp_rank=r, dp_size=2) for r in (0, 1)]
    garbage(bad[0])
    bad[1].unlink()
    messages = []
    for loader in loaders:
        with pytest.raises(EmptyDatasetError) as raised:
            draw(loader, 20)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]  # consumer 0 got the garbage shard, consumer 1 the missing one
    assert messages[0].startswith(
        f"dataset 'bad' (shards {root}/bad/bad-{{000000..000001}}.tar): no readable sample in epoch 0 — "
        f"2 shards skipped: 1 as truncated_tar, 1 as missing_shard (first: {bad[0]}: tar stream broken before "
        "the first sample")
    assert "data.on_empty_dataset=drop" in messages[0]


def test_drop_takes_the_dataset_out_says_so_once_and_counts_it(mix, caplog):
    root, bad = mix
    datasets = [DatasetSpec(str(root / "good"), 3.0, "good"), DatasetSpec(str(root / "bad"), 1.0, "bad")]
    for path in bad:
        garbage(path)
    caplog.set_level(logging.WARNING, logger="qwen3vl.data")
    counts = []
    for rank in (0, 1):
        loader = loader_for(datasets, dp_rank=rank, dp_size=2, on_empty_dataset="drop")
        batches = draw(loader, 12)  # several epochs of 'good': the run goes on
        assert all(b.cu_seqlens[-1] > 0 for b in batches)
        assert loader.stream.mixture.active.tolist() == [True, False]
        counts.append(loader.skipped_counts())
    said = [r.getMessage() for r in caplog.records if "leaves the mixture" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("dataset 'bad'") and "the others now weigh good 1" in said[0]
    assert counts[0] == {"empty_dataset": 1, "truncated_tar": 1} and counts[1] == {"truncated_tar": 1}


def test_drop_of_the_last_dataset_still_stops(mix):
    root, bad = mix
    for path in bad:
        garbage(path)
    loader = loader_for([DatasetSpec(str(root / "bad"), 1.0, "bad")], on_empty_dataset="drop")
    with pytest.raises(EmptyDatasetError, match=r"every dataset is empty or finished .* dataset 'bad'"):
        draw(loader, 4)


def test_a_consumer_whose_own_shards_are_broken_is_told_so(tmp_path):
    """Readable shards elsewhere: not a droppable empty dataset, but this consumer has nothing to read."""
    paths = write_text_shards(tmp_path, "d", shards=2, per_shard=4)
    cfg = LoaderConfig(datasets=[DatasetSpec(str(tmp_path), 1.0, "docs")], shuffle_buffer=1, pack_buffer=2,
                       shuffle_shards=False, on_empty_dataset="drop")
    loader = build_loader(cfg, seq_length=128, dp_rank=1, dp_size=2)  # reads d-000001 alone
    garbage(paths[1])
    with pytest.raises(DatasetError, match=r"dataset 'docs' .*consumer 1 of 2 .*got no readable sample in epoch 0 "
                                           r"— 1 shard skipped as truncated_tar .*other shards of the dataset are "
                                           r"readable") as raised:
        draw(loader, 4)
    assert not isinstance(raised.value, EmptyDatasetError)


def test_shards_that_break_mid_run_are_skipped_and_counted(tmp_path):
    """Inside epoch 0: a shard not yet opened is truncated, another replaced by garbage; between epochs
    0 and 1 a shard already read is deleted. Every fault is skipped by reason and the loader goes on."""
    paths = write_text_shards(tmp_path, "s", shards=4, per_shard=4)
    cfg = LoaderConfig(datasets=[DatasetSpec(str(tmp_path), 1.0, "docs")], shuffle_buffer=1, pack_buffer=2,
                       shuffle_shards=False)
    loader = build_loader(cfg, seq_length=128)
    stream = loader.stream.streams[0]

    def draw_until(done):
        for _ in range(200):
            if done():
                return
            next(loader)
        raise AssertionError(f"stuck at epoch {stream.epoch}, position {stream.emitted}")

    draw(loader, 1)
    assert stream.epoch == 0 and stream.emitted < 8, "shards 2 and 3 must still be unopened"
    truncate(paths[2])
    garbage(paths[3])
    draw_until(lambda: stream.epoch == 1)
    assert loader.skipped_counts() == {"truncated_tar": 2}
    assert stream.emitted < 4, "shard 1 must still be unopened in epoch 1"
    paths[1].unlink()
    draw_until(lambda: stream.epoch == 2)
    assert loader.skipped_counts() == {"truncated_tar": 4, "missing_shard": 1}
    draw(loader, 3)  # and on, epoch after epoch


# --- two gloo ranks through the trainer -----------------------------------------------------------
PER_SHARD = 2  # samples per shard: 4 shards a rank and epoch, an epoch in ~4 steps of 128-token rows


def faulty_training_body(cfg) -> dict:
    """Trains ``cfg``; at the first step where every rank has read a shard of the epoch and has another
    still unopened, each rank breaks shards of its own share: rank 0 deletes one it has read (read again
    next epoch, by either rank) and replaces one not opened yet with garbage, rank 1 truncates one not
    opened yet (both are read this epoch)."""
    import torch
    import torch.distributed as dist

    from qwen3vl.train import app, loop

    real_draw, seen = loop.draw_microbatches, {"broken": False}

    def draw_with_faults(loader, count):
        seen["loader"] = loader
        if not seen["broken"]:
            stream = loader.stream.streams[0]
            order = stream.epoch_shards(stream.epoch)
            reading = stream.emitted // PER_SHARD  # the shard being read (shuffle_buffer 1: one sample ahead)
            read, unopened = order[:reading], order[reading + 1:]
            ready = torch.tensor([int(bool(read and unopened))])
            dist.all_reduce(ready, op=dist.ReduceOp.MIN)
            if ready.item():
                if dist.get_rank() == 0:
                    Path(read[0]).unlink()
                    garbage(Path(unopened[0]))
                else:
                    truncate(Path(unopened[0]))
                dist.barrier()
                seen["broken"] = True
        return real_draw(loader, count)

    loop.draw_microbatches = draw_with_faults
    try:
        outcome = app.train(cfg)
    finally:
        loop.draw_microbatches = real_draw
    return {"outcome": outcome, "broken": seen["broken"], "skipped": seen["loader"].skipped_counts()}


def test_shards_breaking_during_a_two_rank_run_are_counted_in_metrics_and_it_goes_on(tmp_path):
    from qwen3vl_testing.training import tiny_config

    write_text_shards(tmp_path / "docs", "docs", shards=8, per_shard=PER_SHARD)
    steps = 10
    cfg = tiny_config(str(tmp_path / "run"), str(tmp_path / "demo"), world_size=2, steps=steps, seq_length=128,
                      overrides=[f"data.datasets=[{{name: docs, shards: '{tmp_path}/docs'}}]",
                                 "data.shuffle_buffer=1", "data.pack_buffer=2",
                                 "data.num_workers=0"])  # the body breaks shards of the in-process stream's share
    results = run_distributed(faulty_training_body, world_size=2, timeout=300, cfg=cfg)
    assert [(r["outcome"], r["broken"]) for r in results] == [("done", True)] * 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))
    assert lines[0]["datasets"] == [{"name": "docs", "weight": 1.0, "shards": f"{tmp_path}/docs"}]
    per_rank = [r["skipped"] for r in results]
    assert per_rank[0].get("truncated_tar", 0) >= 1 and per_rank[1].get("truncated_tar", 0) >= 1, per_rank
    total = {k: per_rank[0].get(k, 0) + per_rank[1].get(k, 0) for k in {*per_rank[0], *per_rank[1]}}
    assert total.get("missing_shard", 0) >= 1, per_rank  # the deleted shard, next epoch
    assert {k: v for k, v in lines[-1]["skipped"].items() if k != "nan_loss_steps"} == total  # both ranks'


def test_qwen3vl_data_ends_a_failure_with_one_line(tmp_path, capsys):
    from qwen3vl.data.cli import main

    assert main(["inspect", str(tmp_path / "gone-{0..2}.tar")]) == 2
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert last == (f"qwen3vl-data inspect: error: FileNotFoundError: shard {tmp_path}/gone-0.tar does not exist "
                    "(and 2 more); fix the dataset path or pattern")
