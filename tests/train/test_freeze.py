"""Stage 0 trains only the merger and the three DeepStack mergers; the rest stays bitwise equal."""
from __future__ import annotations

import torch

from qwen3vl_testing.distributed import run_distributed
from qwen3vl.train.freeze import apply_freeze, part_of, trainable_parts
from qwen3vl_testing.training import fixed_rows, named_parameters, tiny_config, train_on_rows


def test_parts_by_name():
    assert part_of("module.vision.merger.linear_fc1.weight") == "merger"
    assert part_of("vision.deepstack_merger_list.2.norm.weight") == "merger"
    assert part_of("vision.layers.3.self_attention.linear_qkv.weight") == "vision"
    assert part_of("decoder.layers.0.mlp.linear_fc1.weight") == "llm"
    assert part_of("embedding.word_embeddings.weight") == "llm"
    assert trainable_parts(["merger", "deepstack_merger"]) == {"merger"}
    assert trainable_parts("all") == {"vision", "merger", "llm"}


def changed_body(cfg, rows) -> tuple[list[str], list[str]]:
    def inspect(setup, moment):
        return named_parameters(setup)

    run = train_on_rows(cfg, rows, inspect=inspect)
    before, after = run.extra["before"], run.extra["after"]
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    unchanged = sorted(n for n in before if torch.equal(before[n], after[n]))
    return changed, unchanged


def test_stage0_changes_only_merger_parameters(demo_dir, tmp_path):
    cfg = tiny_config(str(tmp_path / "s0"), demo_dir, world_size=2, recipe="stage0_align", steps=2)
    rows = fixed_rows(cfg, 2, 2)
    for changed, unchanged in run_distributed(changed_body, world_size=2, timeout=300, cfg=cfg, rows=rows):
        assert changed, "no parameter trained"
        assert all(part_of(n) == "merger" for n in changed), [n for n in changed if part_of(n) != "merger"]
        assert [n for n in unchanged if part_of(n) == "merger"] == []  # every merger parameter trained
        parts = {part_of(n) for n in unchanged}
        assert parts == {"vision", "llm"}, parts
        assert any("deepstack_merger" in n for n in changed) and any(".merger." in n for n in changed)


def test_apply_freeze_counts_trainable_elements():
    model = torch.nn.Module()
    model.vision = torch.nn.Module()
    model.vision.merger = torch.nn.Linear(2, 3)
    model.vision.blocks = torch.nn.Linear(2, 2, bias=False)
    model.decoder = torch.nn.Linear(4, 1, bias=False)
    counts = apply_freeze([model], ["merger"])
    assert counts == {"vision": 0, "merger": 9, "llm": 0}
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]
