"""Five steps of the tiny Qwen3-VL give the same per-step losses under every parallel layout.

The same five global batches (packed rows of the demo corpus drawn once with the real loader) and the
same initial weights (saved by the single-rank reference, loaded through the resharding checkpoint
path) are trained under single rank, DP2, TP2, PP2 (1F1B) and CP2 — and EP2 for tiny-moe — with the
app's own model/optimizer/loop code. fp32 on CPU; every step's loss within 1e-5 relative.
"""
from __future__ import annotations

import pytest

from qwen3vl.parallel.testing import run_distributed
from qwen3vl.train.testing import fixed_rows, tiny_config, train_on_rows

STEPS, ROWS = 5, 2
LAYOUTS = {
    ("tiny", "dp2"): [],
    ("tiny", "tp2"): ["parallel.tp=2"],
    ("tiny", "pp2"): ["parallel.pp=2", "parallel.pipeline_layers=[3,1]"],  # DeepStack: layers 0-2 on stage 0
    ("tiny", "cp2"): ["parallel.cp=2"],
    ("tiny-moe", "ep2"): ["parallel.ep=2"],
}


def losses_body(cfg, rows, init_from=None, save_init_to=None) -> list[float]:
    return train_on_rows(cfg, rows, init_from=init_from, save_init_to=save_init_to).losses


@pytest.fixture(scope="module")
def references(demo_dir, tmp_path_factory):
    """Per model: (rows, initial weights, single-rank losses), computed on first use."""
    cache = {}

    def get(model: str):
        if model not in cache:
            tmp = tmp_path_factory.mktemp(f"ref_{model}")
            cfg = tiny_config(str(tmp / "run"), demo_dir, world_size=1, model=model, steps=STEPS, rows_per_step=ROWS)
            rows = fixed_rows(cfg, STEPS, ROWS)
            init = str(tmp / "init")
            losses = run_distributed(losses_body, world_size=1, timeout=300, cfg=cfg, rows=rows, save_init_to=init)[0]
            assert len(losses) == STEPS and losses[-1] < losses[0], f"the reference does not learn: {losses}"
            cache[model] = (rows, init, losses)
        return cache[model]

    return get


@pytest.mark.parametrize("model,layout", list(LAYOUTS), ids=[f"{m}-{l}" for m, l in LAYOUTS])
def test_layout_gives_the_single_rank_losses(model, layout, references, demo_dir, tmp_path):
    rows, init, reference = references(model)
    cfg = tiny_config(str(tmp_path / "run"), demo_dir, world_size=2, model=model, steps=STEPS, rows_per_step=ROWS,
                      overrides=LAYOUTS[(model, layout)])
    per_rank = run_distributed(losses_body, world_size=2, timeout=300, cfg=cfg, rows=rows, init_from=init)
    assert all(r == per_rank[0] for r in per_rank), f"ranks disagree on the loss: {per_rank}"
    assert per_rank[0] == pytest.approx(reference, rel=1e-5), f"{layout}: {per_rank[0]} vs single rank {reference}"
