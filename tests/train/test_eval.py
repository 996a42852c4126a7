"""Held-out evaluation gives the same values under every layout, and covers its pass exactly once.

The tiny model's initial weights are saved by a single-rank run, which evaluates the demo corpus's held-out
split with them (the reference); then the same weights are loaded under DP2, TP2 (sequence parallel), PP2
(pipelined forward-only schedule) and CP2 on 2 gloo ranks (one pool: its processes start once) and evaluated
again. Every layout must give the reference's token-mean and square-root losses within 1e-6 relative (fp32,
CPU), the same on every rank, and exactly its token count, which must be the loss tokens of the held-out rows
as the test process counts them itself. The pass has an odd number of rows, so under DP2 one rank fills its
schedule with a row that must not count.
"""
from __future__ import annotations

import math

import pytest

from qwen3vl_testing.distributed import run_distributed
from qwen3vl_testing.training import EVAL_DEMO_HELDOUT, evaluate_weights, tiny_config

RELATIVE_TOLERANCE = 1e-6
LAYOUTS = {
    "dp2": [],
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2", "parallel.pipeline_layers=[3,1]"],
    "cp2": ["parallel.cp=2", "parallel.cp_comm_type=all_gather"],
}


def loss_tokens_of_the_pass(cfg) -> tuple[int, int]:
    """(rows, loss tokens) of the held-out pass, counted here from the rows themselves."""
    from qwen3vl.data.batch import IGNORE_INDEX

    [eval_set] = cfg.eval.eval_sets(cfg.data, cfg.train.seq_length, pad_multiple=1)
    total, rows = eval_set.rows()
    return total, sum(int((row.labels != IGNORE_INDEX).sum()) for _, row in rows)


def test_evaluation_gives_the_single_rank_values_under_every_layout(demo_dir, tmp_path):
    def config(world_size: int, overrides=()):
        return tiny_config(str(tmp_path / "run"), demo_dir, world_size=world_size, overrides=[*EVAL_DEMO_HELDOUT, *overrides])

    init = str(tmp_path / "init")
    [reference] = run_distributed(evaluate_weights, world_size=1, timeout=600, cfg=config(1), save_init_to=init)
    rows, tokens = loss_tokens_of_the_pass(config(1))
    assert rows % 2 == 1, f"the held-out pass should have an odd number of rows (DP2 then pads), has {rows}"
    [ref] = reference
    assert ref["dataset"] == "heldout" and ref["tokens"] == tokens > 0
    assert math.isfinite(ref["loss_token_mean"]) and math.isfinite(ref["loss_sqrt"])
    assert ref["loss_sqrt"] != ref["loss_token_mean"]  # the samples differ in length: the weights matter
    assert ref["perplexity"] == pytest.approx(math.exp(ref["loss_token_mean"]))
    for name, overrides in LAYOUTS.items():
        per_rank = run_distributed(evaluate_weights, world_size=2, timeout=600, cfg=config(2, overrides), init=init)
        assert per_rank[0] == per_rank[1], f"{name}: the ranks disagree: {per_rank}"
        [ours] = per_rank[0]
        assert ours["tokens"] == ref["tokens"], f"{name}: {ours} vs single rank {ref}"
        for key in ("loss_token_mean", "loss_sqrt"):
            difference = abs(ours[key] - ref[key]) / abs(ref[key])
            print(f"{name} {key}: relative difference {difference:.1e}")
            assert difference <= RELATIVE_TOLERANCE, f"{name}: {ours} vs single rank {ref}"
