"""A run moves between layouts mid-epoch with nothing lost: DP2 -> TP2 (DP1) and back, through the app.

Each case trains K steps under one layout with ``data.trace=true`` and a checkpoint, then resumes the
same run directory under another layout (data-parallel size, tensor-parallel size and loader worker
count all change; model and optimizer reshard, the loader position is re-partitioned) and trains on.
The oracle is the data trace, read back through ``qwen3vl-data trace-summary``: every sample of the
first epoch was trained on exactly once over the whole run, and no sample of a later epoch twice.
"""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from qwen3vl.data.cli import main as data_cli
from qwen3vl.data.shards import ShardWriter
from qwen3vl_testing.distributed import run_distributed
from qwen3vl_testing.training import tiny_config

K, STEPS = 2, 7


def app_body(cfg) -> str:
    from qwen3vl.train.app import train

    return train(cfg)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> list[str]:
    """Two small datasets, so that a few steps of 2 rows of 256 tokens run through whole epochs."""
    out = tmp_path_factory.mktemp("elastic_corpus")
    with ShardWriter(out / "text", "t", max_samples=7) as writer:
        for i in range(20):
            writer.write(f"t{i:03d}", {"kind": "text", "text": f"Document {i} says that shapes have {i % 5} corners."})
    with ShardWriter(out / "caption", "c", max_samples=5) as writer:
        for i in range(10):
            image = io.BytesIO()
            Image.new("RGB", (32, 32), (20 * i, 100, 200)).save(image, format="JPEG")
            writer.write(f"c{i:03d}", {"kind": "caption", "images": ["0.jpg"], "text": f"Colour number {i}."},
                         {"0.jpg": image.getvalue()})
    return [str(out / "text"), str(out / "caption")]


def config(run_dir, demo_dir, corpus, steps: int, layout: list[str]):
    datasets = ",".join(f"{{name:{name},shards:'{path}',weight:1.0}}"
                        for name, path in zip(("text", "caption"), corpus))
    return tiny_config(run_dir, demo_dir, world_size=2, steps=steps, overrides=[
        f"data.datasets=[{datasets}]", "data.trace=true", "data.pack_buffer=4", "data.shuffle_buffer=4",
        "+data.processing.min_pixels=1024", "+data.processing.max_pixels=4096", f"train.save_interval={K}", *layout])


@pytest.mark.parametrize("before,after", [
    (["parallel.tp=1", "data.num_workers=2"], ["parallel.tp=2", "data.num_workers=0"]),
    (["parallel.tp=2", "data.num_workers=0"], ["parallel.tp=1", "data.num_workers=1"]),
], ids=["dp2-to-tp2", "tp2-to-dp2"])
def test_a_run_continues_under_another_layout_with_every_sample_once(before, after, demo_dir, small_corpus,
                                                                      tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert run_distributed(app_body, world_size=2, timeout=600,
                           cfg=config(run_dir, demo_dir, small_corpus, STEPS, [*before, f"train.stop_at_step={K}"])) == ["done"] * 2
    assert run_distributed(app_body, world_size=2, timeout=600,
                           cfg=config(run_dir, demo_dir, small_corpus, STEPS, after)) == ["done"] * 2
    capsys.readouterr()
    assert data_cli(["trace-summary", run_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 2 * STEPS  # two rows a step, each traced once (by one rank of its replica)
    for name, epochs in report["datasets"].items():
        first = epochs["0"]
        assert first["once"] == first["samples"] and first["twice"] == first["more"] == 0, (name, epochs)
        assert all(e["twice"] == e["more"] == e["not_in_shards"] == 0 for e in epochs.values()), (name, epochs)
        assert len(epochs) >= 2, f"{name}: the run should have reached a second epoch: {epochs}"
