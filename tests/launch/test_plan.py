"""qwen3vl-plan: a fitting, explained layout for 235B-A22B at 256K on 1,024 H100s; exact parameter counts
(transformers' meta model; the built roles against the counted pieces); every recipe's own layout fits
the presets docs/training.md names for it; the activation model within 10% of one measured CPU step
(the issue asks 20%; measured: 6.5% at most)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from qwen3vl.launch.plan_layouts import balanced_split

GIB = 2 ** 30
H100_USABLE = (79.6 - 6.0) * GIB  # the H100's memory minus the planner's default reserve


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3vl.launch.plan", *args], capture_output=True, text=True,
                          timeout=900)


def run_script(source: str) -> object:
    """A fresh interpreter (the planner's fake process group needs one without torch.distributed);
    the script prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_235b_at_256k_on_1024_h100s_gets_a_fitting_layout_and_its_explanation():
    done = run_plan("--model", "235B-A22B", "--recipe", "stage3_256k", "--gpus", "1024", "--gpu", "h100", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    layouts = json.loads(done.stdout.strip().splitlines()[-1])["layouts"]
    best = layouts[0]
    assert set(best) >= {"tp", "pp", "cp", "ep", "etp", "dp", "parameters", "memory_bytes", "fits", "step_time_s"}
    memory = best["memory_bytes"]
    assert set(memory) == {"weights", "grads", "optimizer", "activations", "total"}
    assert abs(memory["total"] - sum(v for k, v in memory.items() if k != "total")) <= 4
    assert best["fits"] and memory["total"] <= H100_USABLE
    assert all(l["tp"] * l["pp"] * l["cp"] * l["dp"] == 1024 for l in layouts)
    fits = [l["fits"] for l in layouts]
    assert fits == sorted(fits, reverse=True) and not all(fits)  # fitting first; some do not fit
    times = [l["step_time_s"] for l in layouts if l["fits"]]
    assert times == sorted(times)
    # 235B-A22B cannot hold its experts without expert parallelism on 80 GB.
    assert all(not l["fits"] for l in layouts if l["ep"] == 1)
    paragraph = next(line for line in done.stdout.splitlines() if line.startswith("Best fitting layout"))
    assert f"TP{best['tp']}" in paragraph and f"EP{best['ep']}" in paragraph and "usable GiB" in paragraph


COUNTS = """
import json, torch
from qwen3vl.launch.plan_params import RoleCounter, build_roles
from qwen3vl.model.interop.hf_config import config_to_hf
from qwen3vl.model.interop.transformers_models import transformers_config_and_class
from qwen3vl.model.presets import get_preset
from qwen3vl.parallel.layout import ParallelLayout as L

out = []
for preset, layout, world in [
        ("tiny", L(pp=2, pipeline_layers=(3, 1)), 2),
        ("tiny-moe", L(pp=2, ep=2, pipeline_layers=(3, 1)), 4),
        ("tiny-moe", L(tp=2, ep=2, sequence_parallel=True), 4),
        ("2B", L(pp=2), 8),                                    # tied: the last stage holds a copy
        ("235B-A22B", L(pp=8, ep=16, pipeline_layers=(11, 12, 12, 12, 12, 12, 12, 11)), 128),
        ("8B", L(tp=2, pp=4, vpp=3, sequence_parallel=True), 16),
        ("30B-A3B", L(tp=2, pp=2, ep=4, etp=1, sequence_parallel=True), 16),
        ("30B-A3B", L(tp=2, sequence_parallel=True), 4)]:     # ep=1: experts count as dense
    config = get_preset(preset)
    built = build_roles(config, layout, world, "all")
    counted = RoleCounter(config, "all").roles(layout)
    hf = None
    if layout.tp == 1:  # one pipeline replica, experts summed over the EP ranks
        hf_config, hf_class = transformers_config_and_class(config_to_hf(config))
        with torch.device("meta"):
            theirs = hf_class(hf_config)
        hf = sum(p.numel() for p in theirs.parameters())
        tied = config.text.vocab_size * config.text.hidden_size if config.tie_word_embeddings else 0
        ours = sum(r.total + (layout.ep - 1) * r.trained_expert for r in built) - tied * (layout.pp > 1)
        hf = (ours, hf)
    out.append({"preset": preset, "built": [(r.total, r.trained, r.trained_expert) for r in built],
                "counted": [(r.total, r.trained, r.trained_expert) for r in counted], "hf": hf})
print(json.dumps(out))
"""


def test_parameter_counts_per_rank_are_exact():
    for case in run_script(COUNTS):
        assert case["built"] == case["counted"], case["preset"]
        if case["hf"] is not None:
            ours, theirs = case["hf"]
            assert ours == theirs, case["preset"]
        if len(case["built"]) > 1:
            assert len(set(map(tuple, case["built"]))) > 1  # the roles differ (first, middle, last stage)


def test_an_impossible_request_is_refused_with_what_to_change():
    done = run_plan("--model", "235B-A22B", "--recipe", "stage3_256k", "--gpus", "8", "--json")
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("qwen3vl-plan: Nothing fits") and "235B-A22B" in error and "use more GPUs" in error
    layouts = json.loads(done.stdout.strip().splitlines()[-1])["layouts"]
    assert layouts and not any(l["fits"] for l in layouts)
    assert min(l["memory_bytes"]["total"] for l in layouts) > H100_USABLE
    done = run_plan("--model", "tiny", "--recipe", "stage1_mm", "--gpus", "6", "--layout", "tp=4")
    assert done.returncode == 2 and "parallel.tp" in done.stderr and "choose" in done.stderr, done.stderr


# (recipe, preset, GPUs, GPU): the recipe's own layout and the presets docs/training.md says it serves.
RECIPE_CASES = [
    ("stage0_align", "2B", 64, "h100"),
    ("stage0_align", "8B", 64, "h100"),  # CP2: 45.5 GiB; pure DP needs 72.2 of the usable 73.6
    ("stage1_mm", "2B", 64, "h100"),
    ("stage1_mm", "4B", 64, "h100"),
    ("stage1_mm", "8B", 64, "h100"),  # TP2+SP, CP2: 50.4 GiB; TP2 alone needs 73.8
    ("stage2_32k", "8B", 64, "h100"),  # TP4+SP, CP2: 66.2 GiB
    ("stage3_256k", "8B", 64, "h100"),
]

RECIPES = """
import json
from qwen3vl.launch.plan import build_parser, plan
out = []
for recipe, preset, gpus, gpu in {cases!r}:
    plans, model, work, hw = plan(build_parser().parse_args(
        ["--recipe", recipe, "--model", preset, "--gpus", str(gpus), "--gpu", gpu, "--layout", "recipe"]))
    p = plans[0]
    out.append([recipe, preset, p.fits, p.memory[p.worst].total / 2 ** 30, hw.memory_gib])
print(json.dumps(out))
"""


def test_every_recipe_layout_fits_the_presets_it_is_documented_for():
    for recipe, preset, fits, gib, memory in run_script(RECIPES.format(cases=RECIPE_CASES)):
        assert fits, f"{recipe} with {preset}: {gib:.1f} GiB on a {memory} GiB GPU"


# (preset, recipe, overrides): no recompute, full recompute of the LLM and the ViT, a frozen LLM (S0), and
# selective recompute of the norms and the MLP (dense) or of the attention core, the norms and the MoE layer.
SELECTIVE = "train.recompute.granularity=selective"
MEASURED = [("2B", "stage1_mm", ()), ("2B", "stage3_256k", ()), ("2B", "stage0_align", ()),
            ("2B", "stage1_mm", (SELECTIVE, "train.recompute.modules=[layernorm,mlp]")),
            ("30B-A3B", "stage1_mm", (SELECTIVE, "train.recompute.modules=[core_attn,layernorm,moe]"))]

# The command's own main() for each case, in one interpreter: the imports (megatron-core, transformers) are
# most of a case's time, and plan() and measure() leave no process-wide state behind (measure ends its group).
MEASURE_ALL = """
import contextlib, io, json
from qwen3vl.launch.plan import main
out = {{}}
for preset, recipe, overrides in {cases!r}:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        # The measurement does not depend on the GPU; ample memory keeps the exit status about it alone.
        code = main(["--model", preset, "--recipe", recipe, "--gpus", "64", "--layout", "recipe", "--measure",
                     "--json", "--gpu-memory-gib", "4096", *overrides])
    out[" ".join([preset, recipe, *overrides])] = [code, stdout.getvalue(), stderr.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured_plans() -> dict:
    return run_script(MEASURE_ALL.format(cases=MEASURED))


@pytest.mark.parametrize("preset,recipe,overrides", MEASURED)
def test_measure_puts_the_activation_model_within_10_percent_of_a_real_step(preset, recipe, overrides,
                                                                            measured_plans):
    code, stdout, stderr = measured_plans[" ".join([preset, recipe, *overrides])]
    assert code == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert len(result["layouts"]) == 1
    parts = result["measured"]["by_part"]
    assert set(parts) == {"llm", "vision", "other"} and parts["llm"]["measured"] > 0
    for name, part in parts.items():
        assert part["predicted"] == pytest.approx(part["measured"], rel=0.1), (name, parts)
    assert result["measured"]["activation_bytes"] == sum(p["measured"] for p in parts.values())
    assert "measured MiB" in stdout


def test_uneven_pipeline_splits_keep_deepstack_on_the_first_stage():
    assert balanced_split(36, 4, 3) is None  # even: megatron's own split
    assert balanced_split(94, 8, 3) == (11, 12, 12, 12, 12, 12, 12, 11)
    split = balanced_split(10, 5, 3)
    assert sum(split) == 10 and split[0] >= 3 and min(split) >= 1
    with pytest.raises(ValueError, match="cannot fill"):
        balanced_split(4, 4, 3)
