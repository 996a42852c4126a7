"""The training config: composition, typed schema, and every bad config failing in load_config before any
process group exists, with a message that names the field and the fix."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
from omegaconf import OmegaConf

from qwen3vl.train.config import (RECIPES_DIR, ConfigError, Qwen3VLTrainConfig, app_argv, compose_recipe,
                                  config_from_hydra, load_config, parse_app_argv, run_shape, to_yaml)
from qwen3vl.train.config_checks import build_model_config
from qwen3vl.train.schedule import SCHEDULE_FILE, plan_file_text, plan_of

TINY = ["model=tiny", "data=demo", "parallel.cp=1"]  # the recipes' tensor parallelism on 2 CPU ranks


def _error(recipe: str, overrides: list[str], world_size: int = 2, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, overrides, world_size=world_size, **kw)
    assert not dist.is_initialized()  # every check ran before any process group
    return str(info.value)


def test_demo_run_loads_for_two_ranks_with_derived_sizes(tmp_path):
    cfg = load_config("stage0_align", TINY + [f"run_dir={tmp_path}/run", "train.steps=7"], world_size=2)
    assert isinstance(cfg, Qwen3VLTrainConfig)
    assert (cfg.model.preset, cfg.train.steps, cfg.train.seq_length) == ("tiny", 7, 1024)
    assert cfg.run_dir == str(tmp_path / "run") and Path(cfg.data.demo_dir).is_absolute()
    shape = run_shape(cfg, 2)
    assert (shape.dp, shape.global_rows, shape.num_microbatches, shape.pad_multiple) == (2, 4, 2, 1)


def test_the_schedule_spans_the_token_budget_and_train_steps_only_says_where_to_stop():
    cfg = load_config("stage1_mm", TINY + ["train.token_budget=1e6", "train.global_batch_tokens=8192"], 2)
    assert cfg.train.steps == 123  # ceil(1e6 / 8192): the end of the budget
    shape = run_shape(cfg, 2)
    assert (shape.steps, shape.total_steps, shape.warmup_steps) == (123, 123, 1)  # warmup round(0.01 · 123)
    stopped = load_config("stage1_mm", TINY + ["train.token_budget=1e6", "train.global_batch_tokens=8192",
                                                "train.steps=5", "train.stop_at_step=3"], 2)
    assert (stopped.train.steps, stopped.train.stop_at_step) == (5, 3)
    assert plan_of(stopped) == plan_of(cfg) and run_shape(stopped, 2).total_steps == 123
    explicit = load_config("stage1_mm", TINY + ["schedule.total_steps=40", "train.steps=10"], 2)
    assert (plan_of(explicit).total_steps, plan_of(explicit).warmup_steps, explicit.train.steps) == (40, 0, 10)
    msg = _error("stage1_mm", TINY + ["train.token_budget=1e6", "train.global_batch_tokens=8192", "train.steps=200"])
    assert ("train.steps=200 runs past the end of the schedule (123 steps = train.token_budget=1e+06 / "
            "train.global_batch_tokens=8192)") in msg
    msg = _error("stage1_mm", TINY + ["train.token_budget=null", "train.steps=5", "train.stop_after_minutes=0",
                                      "train.stop_at_step=0"])
    assert "the schedule has no horizon: set train.token_budget=" in msg and "schedule.total_steps=N" in msg
    assert "train.stop_after_minutes=0.0 must be positive" in msg and "train.stop_at_step=0 must be at least 1" in msg


def test_a_resume_that_changes_the_saved_schedule_is_refused_before_any_rank_starts(tmp_path):
    run = [f"run_dir={tmp_path}", "train.token_budget=81920", "train.global_batch_tokens=8192"]  # 10 steps
    saved = load_config("stage1_mm", TINY + run, 2)
    checkpoint = tmp_path / "checkpoints" / "iter_0000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / SCHEDULE_FILE).write_text(plan_file_text(plan_of(saved)))
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000004\n")
    assert load_config("stage1_mm", TINY + run + ["train.steps=6"], 2).train.steps == 6  # a stop is no change
    msg = _error("stage1_mm", TINY + run + ["train.token_budget=163840", "optim.lr.merger=1e-3",
                                            "schedule.decay_style=wsd"])
    assert "run_dir=" in msg and "resumes from iter_0000004, whose schedule this config would change" in msg
    for change in ("schedule.total_steps (or train.token_budget / train.global_batch_tokens): saved 10, new 20",
                   "schedule.decay_style: saved cosine, new wsd", "'merger': 0.0001", "'merger': 0.001",
                   "schedule.wsd_decay_fraction: saved None, new 2", "schedule.on_resume=replan"):
        assert change in msg
    replan = load_config("stage1_mm", TINY + run + ["train.token_budget=163840", "schedule.on_resume=replan"], 2)
    assert plan_of(replan).total_steps == 20
    assert load_config("stage1_mm", TINY + run + ["train.token_budget=163840"], 2, check_paths=False)  # login node


def test_layout_error_names_the_rule_and_the_fix():
    msg = _error("stage0_align", TINY + ["parallel.tp=2"], world_size=3)
    assert "parallel: world size 3 is not divisible by tp·pp·cp" in msg and "reduce tp, pp or cp" in msg
    msg = _error("stage0_align", TINY + ["parallel.tp=8"], world_size=8)
    assert "num_attention_heads=4 is not divisible by tp=8" in msg
    assert "parallel.tp=8 does not divide the 4 ViT heads" in msg


def test_recompute_modules_are_megatrons_and_need_selective_granularity():
    selective = "train.recompute.granularity=selective"
    cfg = load_config("stage1_mm", TINY + [selective, "train.recompute.modules=[layernorm,mlp]"], world_size=2)
    assert cfg.train.recompute.megatron_overrides() == dict(recompute_granularity="selective",
                                                            recompute_modules=["layernorm", "mlp"])
    msg = _error("stage1_mm", TINY + [selective, "train.recompute.modules=[layernorm,mlp_act]"])
    assert "train.recompute.modules=['layernorm', 'mlp_act']: use a non-empty list of core_attn, layernorm" in msg
    msg = _error("stage1_mm", TINY + ["train.recompute.granularity=null", "train.recompute.modules=[mlp]"])
    assert "takes effect only with train.recompute.granularity=selective (it is None)" in msg


def test_s3_length_not_divisible_by_two_cp():
    msg = _error("stage3_256k", ["train.seq_length=262000"], world_size=64, check_paths=False)
    assert "train.seq_length=262000 is not divisible by 128 (2·parallel.cp = 32 × parallel.tp = 4" in msg
    assert "use train.seq_length=261888 or 262016" in msg
    msg = _error("stage2_32k", TINY + ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.cp=2",
                                       "train.seq_length=1026", "train.global_batch_tokens=4104"])
    assert "train.seq_length=1026 is not divisible by 4 (2·parallel.cp = 4)" in msg


def test_deepstack_layers_must_be_on_the_first_pipeline_stage():
    msg = _error("stage1_mm", TINY + ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=2",
                                      "parallel.pipeline_layers=[1,3]"])
    assert "DeepStack injects visual features after LLM layers 0..2" in msg
    assert "pipeline_layers with at least 3 layers first" in msg
    # The same split the other way round is fine.
    load_config("stage1_mm", TINY + ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=2",
                                     "parallel.pipeline_layers=[3,1]"], world_size=2)


def test_missing_shards_fail_with_the_dataset_and_pattern(tmp_path):
    for i in range(2):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    pattern = f"{tmp_path}/s-{{000..002}}.tar"
    msg = _error("stage1_mm", ["model=tiny", f"data.datasets=[{{name: web, shards: '{pattern}', weight: 1.0}}]"],
                 world_size=64)
    assert f"data.datasets[0] (web) shards={pattern}: shard {tmp_path}/s-002.tar does not exist" in msg
    assert "fix the path or brace pattern" in msg
    ok = f"{tmp_path}/s-{{000..001}}.tar"
    no_eval = ["eval.datasets=[]", "eval.interval=0"]  # the recipe's held-out sets are not on this machine
    load_config("stage1_mm", ["model=tiny", f"data.datasets=[{{name: web, shards: '{ok}', weight: 1.0}}]", *no_eval],
                world_size=64)


def test_global_batch_must_split_into_rows_and_data_parallel_ranks():
    msg = _error("stage0_align", TINY + ["train.global_batch_tokens=5000"])
    assert "train.global_batch_tokens=5000 is not a whole number of train.seq_length=1024 rows" in msg
    assert "use train.global_batch_tokens=4096" in msg
    msg = _error("stage0_align", TINY + ["train.global_batch_tokens=3072"])
    assert "3 rows of 1024 tokens, not divisible by dp·train.micro_batch_rows = 2·1" in msg
    assert "use train.global_batch_tokens=2048" in msg


def test_every_problem_is_reported_at_once():
    msg = _error("stage0_align", TINY + ["train.loss_exponent=2", "train.trainable=[merger,ears]", "optim.beta2=1.5",
                                         "schedule.min_lr_ratio=-1", "train.steps=null", "train.token_budget=null"])
    for field in ("train.loss_exponent=2.0", "train.trainable=['merger', 'ears']", "optim.beta2=1.5",
                  "schedule.min_lr_ratio=-1.0", "the schedule has no horizon: set train.token_budget="):
        assert field in msg
    assert "invalid training config (5 problem(s))" in msg


def test_trainable_part_needs_a_learning_rate():
    msg = _error("stage0_align", TINY + ["train.trainable=[all]"])
    assert "optim.lr.vision=0.0 but vision is trainable" in msg and "optim.lr.llm=0.0 but llm is trainable" in msg


def test_compose_errors_become_config_errors():
    msg = _error("stage0_align", TINY + ["train.no_such_key=1"])
    assert "does not compose: Could not override 'train.no_such_key'" in msg
    assert "Key 'no_such_key' not in 'TrainCfg'" in msg
    msg = _error("stage0_align", TINY + ["train.steps=many"])
    assert "Value 'many' of type 'str' could not be converted to Integer" in msg
    assert "model/9B" in _error("stage0_align", ["model=9B", "data=demo"])
    assert "unknown recipe 'stage9'" in _error("stage9", [])


def test_model_overrides_and_unknown_model_fields():
    cfg = load_config("stage0_align", TINY + ["++model.overrides={text: {num_layers: 6}, vision.depth: 5}"], 2)
    model = build_model_config(cfg)
    assert (model.text.num_layers, model.vision.depth) == (6, 5)
    msg = _error("stage0_align", TINY + ["+model.overrides.text.layers=6"])
    assert "model.overrides key 'text.layers': TextConfig has no field 'layers'" in msg
    msg = _error("stage0_align", TINY + ["+model.overrides.vision.deepstack_visual_indexes=[0,1,9]"])
    assert "deepstack_visual_indexes [9] are outside the 4 vision blocks" in msg


def test_init_from_and_processing_are_checked(tmp_path):
    msg = _error("stage1_mm", TINY + [f"init_from={tmp_path}/nowhere"])
    assert f"init_from={tmp_path}/nowhere does not exist" in msg
    load_config("stage1_mm", TINY + [f"init_from={tmp_path}"], world_size=2)
    msg = _error("stage1_mm", TINY + ["+data.processing.max_pixel=10"])
    assert "data.processing has unknown keys ['max_pixel']" in msg


def test_recipe_from_a_path_still_finds_the_packaged_groups(tmp_path):
    mine = tmp_path / "my_stage.yaml"
    shutil.copy(RECIPES_DIR / "stage1_mm.yaml", mine)
    mine.write_text(mine.read_text().replace("stage: stage1_mm", "stage: my_stage"))
    cfg = load_config(str(mine), TINY, world_size=2)
    assert cfg.stage == "my_stage" and cfg.run_dir.endswith("runs/my_stage")
    assert parse_app_argv(app_argv(str(mine), ["a=1"])) == (str(mine.resolve()), ["a=1"])
    assert parse_app_argv(["--config-name=stage0_align", "x=1", "-cp", "/r"]) == ("/r/stage0_align.yaml", ["x=1"])
    with pytest.raises(ConfigError, match="--config-name"):
        parse_app_argv(["x=1"])


def test_hydra_dictconfig_and_yaml_round_trip(tmp_path):
    composed = compose_recipe("stage2_32k", ["model=tiny", "data=demo", f"run_dir={tmp_path}"])  # its own layout
    cfg = config_from_hydra(composed)
    again = config_from_hydra(OmegaConf.create(to_yaml(cfg)))
    assert again == cfg
    assert cfg.schedule.decay_style.value == "cosine" and (cfg.parallel.tp, cfg.parallel.cp) == (4, 2)


def test_the_eval_section_is_checked_and_train_eval_interval_names_its_successor(tmp_path):
    cfg = load_config("stage0_align", TINY + [f"run_dir={tmp_path}/run"], world_size=2)
    assert [(d.name, d.shards) for d in cfg.eval.datasets] == [("heldout", "demo")]  # the demo's held-out split
    assert cfg.eval.interval > 0 and cfg.eval.at_start and cfg.eval.at_end
    real = load_config("stage1_mm", [], world_size=64, check_paths=False)
    assert real.eval.datasets and all(d.shards.startswith(real.data.root) for d in real.eval.datasets)
    msg = _error("stage0_align", TINY + ["eval.interval=-1", "eval.samples=0", "eval.tokens=100",
                                         "eval.datasets=[{name: a, shards: demo}, {name: a, shards: demo}]"])
    assert "eval.interval=-1: use 0 (no periodic evaluation) or a positive number of steps" in msg
    assert "eval.samples=0 must be at least 1 (or null)" in msg
    assert "eval.samples=0 and eval.tokens=100 both limit the held-out pass: set one of them to null" in msg
    assert "eval.datasets names ['a', 'a'] repeat" in msg
    msg = _error("stage0_align", TINY + ["eval.datasets=[]", "eval.interval=5"])
    assert "eval.interval=5 but eval.datasets is empty" in msg
    (tmp_path / "h-1.tar").write_bytes(b"")
    msg = _error("stage0_align", TINY + [f"eval.datasets=[{{name: web, shards: '{tmp_path}/h-{{0..1}}.tar'}}]"])
    assert f"eval.datasets[0] (web) shards={tmp_path}/h-{{0..1}}.tar: shard {tmp_path}/h-0.tar does not exist" in msg
    msg = _error("stage0_align", TINY + ["train.eval_interval=5"])
    assert "train.eval_interval was replaced by the eval section: eval.interval=N with eval.datasets" in msg
