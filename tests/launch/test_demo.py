"""The README's main command (qwen3vl.launch.demo): each stage's public command and the caption count the
demo ends with. The whole demo is too long for the suite; its measured run is in docs/benchmarks.md."""
from __future__ import annotations

from pathlib import Path

from qwen3vl.data.demo import split_combos
from qwen3vl.launch import demo
from qwen3vl.train.config import load_config
from qwen3vl.train.schedule import plan_of


def test_the_last_line_counts_captions_with_colour_shape_and_position_right(capsys):
    truths = [c.caption() for c in split_combos(0)[1][:4]]
    wrong_position = truths[2].replace(truths[2].split(" in the ")[1], "somewhere.")
    results = [(truths[0], truths[0]), (truths[1] + " A red square.", truths[1]), (wrong_position, truths[2]),
               ("A in the bottom left.", truths[3])]
    assert demo.report_captions(results) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[-1] == "held-out captions correct: 2/4"
    assert [line.split()[0] for line in lines[:4]] == ["ok", "ok", "wrong", "wrong"]
    assert repr(truths[3]) in lines[3] and "'A in the bottom left.'" in lines[3]


def test_each_stage_command_is_one_stage_whose_budget_is_its_steps(tmp_path, demo_dir):
    data_dir = Path(demo_dir)
    init_from = None
    for stage in demo.STAGES:
        cmd = demo.stage_command(stage, tmp_path, data_dir, nproc=2, init_from=init_from, steps_scale=1.0)
        app_argv = cmd[cmd.index("--") + 1:]
        cfg = load_config(stage.recipe, app_argv, 2, check_paths=False)
        assert (cfg.train.steps, plan_of(cfg).total_steps) == (stage.steps, stage.steps)
        assert cfg.train.seq_length == stage.seq and Path(cfg.run_dir) == tmp_path / stage.name
        assert {d.name for d in cfg.data.datasets} == set(demo.MIX)  # never the held-out subset
        # ... which each stage evaluates instead: at its start and every few steps.
        assert [d.shards for d in cfg.eval.datasets] == ["demo"] and cfg.eval.at_start
        assert 0 < cfg.eval.interval < stage.steps
        assert cfg.init_from == (str(init_from) if init_from else None)
        init_from = tmp_path / stage.name
