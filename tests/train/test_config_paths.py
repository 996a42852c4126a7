"""A run's saved config names its own directory relatively (``run_dir: .``): copied or moved, then used as
the recipe, it resumes where it is now, not where it was; paths outside the run stay absolute."""
from __future__ import annotations

import shutil

import pytest

from qwen3vl.train.config import ConfigError, load_config, to_yaml


def test_a_moved_run_directory_keeps_its_paths(tmp_path):
    run = tmp_path / "runs" / "s1"
    overrides = ["model=tiny", "data=demo", "parallel.cp=1", f"run_dir={run}", f"data.demo_dir={run}/demo", "train.steps=3",
                 f"init_from={tmp_path}/s0",
                 f"data.datasets=[{{name: a, shards: '{run}/shards/a-{{0..1}}.tar'}}, {{name: b, shards: 'pipe:cat /x'}}]"]
    cfg = load_config("stage1_mm", overrides, world_size=2, check_paths=False)
    run.mkdir(parents=True)
    saved = to_yaml(cfg, in_run_dir=True)
    (run / "config.yaml").write_text(saved)
    assert "run_dir: .\n" in saved and "demo_dir: demo\n" in saved and "shards: shards/a-{0..1}.tar\n" in saved
    assert f"init_from: {tmp_path}/s0\n" in saved and "shards: pipe:cat /x\n" in saved  # outside: absolute
    moved = tmp_path / "elsewhere" / "s1"
    shutil.move(run, moved)
    again = load_config(str(moved / "config.yaml"), world_size=2, check_paths=False)
    assert (again.run_dir, again.data.demo_dir, again.init_from) == (str(moved), f"{moved}/demo", f"{tmp_path}/s0")
    assert [d.shards for d in again.data.datasets] == [f"{moved}/shards/a-{{0..1}}.tar", "pipe:cat /x"]
    other = load_config(str(moved / "config.yaml"), [f"run_dir={tmp_path}/new"], world_size=2, check_paths=False)
    assert other.run_dir == f"{tmp_path}/new" and other.data.demo_dir == f"{moved}/demo"  # the command line wins


def test_on_empty_dataset_is_checked():
    with pytest.raises(ConfigError, match=r"data.on_empty_dataset='skip': use stop .* or drop"):
        load_config("stage0_align", ["model=tiny", "data=demo", "parallel.cp=1", "data.on_empty_dataset=skip"],
                    world_size=1)
