"""The layout matrix: every pair of parallel dimensions that 4 ranks allow trains with the single-rank losses.

For the tiny (dense) and tiny-moe models, each layout trains 3 steps through the app's own pieces
(``build_training``: the model, megatron DDP with its GPU defaults, overlapped gradient reduction in
megatron's default buckets, ZeRO-1, the schedule; the loop and its micro-batches), from the single-rank
reference's initial weights (loaded through the resharding checkpoint path) on the same global batches,
whose rows alternate between media and text only (``alternating_rows``: the case that broke overlapped
reduction), and must give the single-rank losses and gradient norms within 1e-5 relative, the same on every
rank. Pairs of DP, TP (always with SP), PP, CP and, for MoE, EP and expert TP; plus PP2×VPP2 with CP2 on
4 ranks, TP2·CP2 (dense) and TP2·EP2 (MoE) with selective recompute of every module megatron offers
(``train.recompute.modules``: the reference recomputes nothing), and TP2·PP2·CP2 (dense) and TP2·EP2·PP2
(MoE) on 8 ranks. The largest differences measured are
listed in docs/parallel.md.
"""
from __future__ import annotations

import math

import pytest

from qwen3vl_testing.distributed import run_distributed
from qwen3vl_testing.training import alternating_rows, tiny_config, train_on_rows

STEPS, SEQ, PAD = 3, 128, 8  # PAD: 2·cp·tp for cp2·tp2 with SP, the largest multiple of any layout here
ROWS = {"tiny": 2, "tiny-moe": 4}  # MoE: 4 rows so that ep2 alone (dp 4) gets one row per rank
RELATIVE_TOLERANCE = 1e-5
SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]
PP = ["parallel.pp=2", "parallel.pipeline_layers=[3,1]"]  # DeepStack: layers 0-2 on stage 0
CP = ["parallel.cp=2"]
EP = ["parallel.ep=2"]
SELECTIVE = ["train.recompute.granularity=selective"]
PAIRS = {
    "dp2-tp2": SP, "dp2-pp2": PP, "dp2-cp2": [*CP, "parallel.cp_comm_type=all_gather"], "tp2-pp2": [*SP, *PP],
    "tp2-cp2": [*SP, *CP], "pp2-cp2": [*PP, *CP],
}
LAYOUTS = {
    **{("tiny", name): o for name, o in PAIRS.items()},
    ("tiny", "pp2-vpp2-cp2"): ["parallel.pp=2", "parallel.vpp=2", "parallel.pipeline_layers=[3,0,0,1]", *CP],
    ("tiny", "tp2-cp2-selective"): [*SP, *CP, *SELECTIVE, "train.recompute.modules=[core_attn,layernorm,mlp]"],
    **{("tiny-moe", name): o for name, o in PAIRS.items()},
    ("tiny-moe", "dp4-ep2"): EP,
    ("tiny-moe", "tp2-ep2"): [*SP, *EP],  # expert TP = TP = 2
    ("tiny-moe", "tp2-ep2-etp1"): [*SP, *EP, "parallel.etp=1"],
    ("tiny-moe", "ep2-etp2"): [*EP, "parallel.etp=2"],  # experts split over TP ranks the dense part has not
    ("tiny-moe", "pp2-ep2"): [*PP, *EP],
    ("tiny-moe", "cp2-ep2"): [*CP, *EP],
    ("tiny-moe", "tp2-ep2-selective"): [*SP, *EP, *SELECTIVE, "train.recompute.modules=[core_attn,layernorm,moe]"],
}
EIGHT_RANKS = {("tiny", "tp2-pp2-cp2"): [*SP, *PP, *CP], ("tiny-moe", "tp2-ep2-pp2"): [*SP, *EP, *PP]}


def _train_body(cfg, rows, init_from=None, save_init_to=None) -> dict:
    def inspect(setup, moment):
        if moment != "before":
            return None
        attention = {getattr(m, "cp_comm_type", None) for chunk in setup.model_chunks for m in chunk.modules()
                     if type(m).__name__ == "PackedCoreAttention" and m.cp_size > 1}
        return {"overlap_grad_reduce": {c.ddp_config.overlap_grad_reduce for c in setup.model_chunks},
                "cp_comm_types": attention}

    run = train_on_rows(cfg, rows, init_from=init_from, save_init_to=save_init_to, inspect=inspect)
    return {"losses": run.losses, "grad_norms": run.grad_norms, **run.extra["before"]}


def _config(model: str, run_dir: str, world_size: int, overrides=()):
    # The rows are given, so the data section is never read: any directory does for the demo corpus.
    return tiny_config(run_dir, run_dir + "-data", world_size=world_size, model=model, steps=STEPS,
                       rows_per_step=ROWS[model], seq_length=SEQ, overrides=overrides)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per model: (rows, initial weights, single-rank result), computed on first use."""
    cache = {}

    def get(model: str):
        if model not in cache:
            tmp = tmp_path_factory.mktemp(f"ref_{model}")
            rows = alternating_rows(model, STEPS, ROWS[model], SEQ, PAD)
            init = str(tmp / "init")
            [result] = run_distributed(_train_body, world_size=1, timeout=600, cfg=_config(model, str(tmp / "run"), 1),
                                       rows=rows, save_init_to=init)
            assert len(result["losses"]) == STEPS and all(math.isfinite(x) for x in result["losses"])
            cache[model] = (rows, init, result)
        return cache[model]

    return get


def relative_differences(per_rank: list[dict], reference: dict) -> tuple[float, float]:
    """The largest |x - ref| / |ref| over the steps, of the loss and of the gradient norm."""
    ours = per_rank[0]
    return tuple(max(abs(a - b) / abs(b) for a, b in zip(ours[key], reference[key]))
                 for key in ("losses", "grad_norms"))


def check_layout(model: str, name: str, overrides, world_size: int, references, tmp_path) -> float:
    rows, init, reference = references(model)
    cfg = _config(model, str(tmp_path / "run"), world_size, overrides)
    assert cfg.parallel.overlap_grad_reduce, "the matrix tests the GPU default: overlapped gradient reduction"
    per_rank = run_distributed(_train_body, world_size=world_size, timeout=900, cfg=cfg, rows=rows, init_from=init)
    assert all(r["overlap_grad_reduce"] == {True} for r in per_rank)
    if cfg.parallel.cp > 1:  # parallel.cp_comm_type reaches the attention of every CP rank
        assert all(r["cp_comm_types"] == {cfg.parallel.cp_comm_type} for r in per_rank), per_rank
    losses = [r["losses"] for r in per_rank]
    assert all(x == losses[0] for x in losses), f"{name}: ranks disagree on the loss: {losses}"
    assert len(losses[0]) == STEPS
    loss_difference, norm_difference = relative_differences(per_rank, reference)
    print(f"{model} {name}: max relative difference loss {loss_difference:.1e}, grad norm {norm_difference:.1e}")
    difference = max(loss_difference, norm_difference)
    assert difference <= RELATIVE_TOLERANCE, (f"{model} {name}: {per_rank[0]['losses']} / {per_rank[0]['grad_norms']} "
                                              f"vs single rank {reference['losses']} / {reference['grad_norms']}")
    return difference


@pytest.mark.parametrize("model,name", list(LAYOUTS), ids=[f"{m}-{n}" for m, n in LAYOUTS])
def test_four_rank_layout_gives_the_single_rank_losses(model, name, references, tmp_path):
    check_layout(model, name, LAYOUTS[(model, name)], 4, references, tmp_path)


def test_eight_rank_layouts_give_the_single_rank_losses(references, tmp_path):
    for (model, name), overrides in EIGHT_RANKS.items():
        check_layout(model, name, overrides, 8, references, tmp_path / name)
