"""The four stage recipes read like the report's table and validate, at real scale and as the tiny demo."""
from __future__ import annotations

import math

import pytest
import yaml

from qwen3vl.model.presets import PRESET_NAMES, get_preset
from qwen3vl.train.config import RECIPES_DIR, available_recipes, load_config, run_shape, trains

STAGES = {  # recipe: (seq length, token budget, trains only the mergers, context parallel)
    "stage0_align": (8192, 67e9, True, True),
    "stage1_mm": (8192, 1e12, False, True),
    "stage2_32k": (32768, 1e12, False, True),
    "stage3_256k": (262144, 1e11, False, True),
}
REAL_WORLD_SIZE = 64  # the 8B on 64 GPUs


def test_the_four_stages_are_packaged():
    assert set(STAGES) <= set(available_recipes())


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_stage_at_real_scale(recipe):
    seq, budget, mergers_only, uses_cp = STAGES[recipe]
    cfg = load_config(recipe, [], world_size=REAL_WORLD_SIZE, check_paths=False)  # no data mounted here
    shape = run_shape(cfg, REAL_WORLD_SIZE)
    assert cfg.stage == recipe and cfg.model.preset == "8B"
    assert cfg.train.seq_length == seq and cfg.train.token_budget == budget
    assert cfg.train.steps == math.ceil(budget / cfg.train.global_batch_tokens) == shape.steps
    assert cfg.train.global_batch_tokens % seq == 0 and shape.num_microbatches >= 1
    assert 0 < shape.warmup_steps < shape.steps
    assert cfg.schedule.min_lr_ratio < 1 and cfg.optim.clip_grad > 0
    assert trains(cfg, "merger") and trains(cfg, "deepstack_merger") and cfg.optim.lr.merger > 0
    assert trains(cfg, "llm") == trains(cfg, "vision") == (not mergers_only)
    if not mergers_only:
        assert cfg.optim.lr.vision > 0 and cfg.optim.lr.llm > 0 and cfg.optim.weight_decay > 0
    assert (cfg.parallel.cp > 1) == uses_cp
    assert seq % shape.pad_multiple == 0
    names = [d.name for d in cfg.data.datasets]
    assert len(names) == len(set(names)) >= 3 and all(d.weight > 0 for d in cfg.data.datasets)
    assert all(d.shards.startswith(cfg.data.root) for d in cfg.data.datasets)


def test_stage_mixes_follow_the_report():
    def mix(recipe):
        cfg = load_config(recipe, [], world_size=REAL_WORLD_SIZE, check_paths=False)
        total = sum(d.weight for d in cfg.data.datasets)
        return {d.name: d.weight / total for d in cfg.data.datasets}

    s0, s1, s2, s3 = (mix(r) for r in sorted(STAGES))
    assert {"caption", "knowledge", "ocr"} == set(s0)  # image-caption / knowledge / OCR
    assert "text" in s1 and len(set(s1) - {"text"}) >= 4  # vision-language + text
    assert s2["text"] > s1["text"] and "long_document" in s2 and "video" in s2  # more text, long docs, video
    assert {"long_video", "long_document"} <= set(s3)
    assert s3["long_video"] + s3["long_document"] > 0.5


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_stage_as_tiny_demo_on_two_ranks(recipe, tmp_path):
    extra = []
    if STAGES[recipe][3]:  # the CPU demo runs the stages with CP2 (or DP2) instead of TP·CP at scale
        extra = ["parallel.tp=1", "parallel.cp=2", "parallel.sequence_parallel=false"]
    cfg = load_config(recipe, ["model=tiny", "data=demo", f"run_dir={tmp_path}", "train.steps=3", *extra],
                      world_size=2)
    assert [d.shards for d in cfg.data.datasets] == ["demo"]
    assert cfg.train.steps == 3 and run_shape(cfg, 2).global_rows >= 2


def test_model_group_has_one_file_per_preset():
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (RECIPES_DIR / "model").glob("*.yaml")}
    assert set(files) == set(PRESET_NAMES)
    for name, content in files.items():
        assert content == {"preset": name}
        get_preset(name)


def test_stage0_freezes_everything_but_the_mergers():
    cfg = load_config("stage0_align", ["model=tiny", "data=demo", "train.steps=1"], world_size=2)
    assert sorted(cfg.train.trainable) == ["deepstack_merger", "merger"]
    assert not trains(cfg, "vision") and not trains(cfg, "llm")
