"""Every ParallelLayout rule, checked without any process group (validate is pure)."""
import pytest

from pathlib import Path

from qwen3vl.parallel.layout import RULES, LayoutError, ParallelLayout

# A Qwen3-VL-2B-like language model: 16 query heads, 8 KV heads, 28 layers.
DENSE = dict(num_attention_heads=16, num_query_groups=8, num_layers=28)


def problems_of(layout: ParallelLayout, world_size: int, **overrides) -> list[str]:
    with pytest.raises(LayoutError) as raised:
        layout.validate(world_size, **{**DENSE, **overrides})
    assert str(raised.value).count("\n  - ") == len(raised.value.problems)
    return raised.value.problems


def only_problem(layout: ParallelLayout, world_size: int, **overrides) -> str:
    found = problems_of(layout, world_size, **overrides)
    assert len(found) == 1, found
    return found[0]


def test_valid_layouts_pass_and_give_dp():
    layout = ParallelLayout(tp=2, pp=2, cp=2).validate(16, seq_length=4096, **DENSE)
    assert layout.dp(16) == 2
    assert ParallelLayout().validate(1, **DENSE).dp(1) == 1
    moe = ParallelLayout(tp=2, ep=4, sequence_parallel=True).validate(8, num_experts=128, **DENSE)
    assert moe.dp(8) == 4


def test_world_size_must_be_divisible_by_tp_pp_cp():
    message = only_problem(ParallelLayout(tp=2, pp=2, cp=2), 12)
    assert "world size 12 is not divisible by tp·pp·cp = 2·2·2 = 8" in message
    assert "multiple of 8" in message
    with pytest.raises(LayoutError, match="not divisible by tp·pp·cp"):
        ParallelLayout(tp=4).dp(6)


def test_heads_and_query_groups_must_be_divisible_by_tp():
    found = problems_of(ParallelLayout(tp=16), 16)
    assert any("num_query_groups=8 (KV heads) is not divisible by tp=16" in p for p in found)
    message = only_problem(ParallelLayout(tp=3), 3, num_attention_heads=16, num_query_groups=3, num_layers=27)
    assert "num_attention_heads=16 is not divisible by tp=3" in message
    assert "divisors of 16" in message


def test_layers_must_be_divisible_by_pp_and_vpp():
    message = only_problem(ParallelLayout(pp=3), 3)
    assert "num_layers=28 is not divisible by pp = 3" in message and "pipeline_layers" in message
    message = only_problem(ParallelLayout(pp=2, vpp=4), 2, num_layers=36)
    assert "num_layers=36 is not divisible by pp·vpp = 8" in message


def test_uneven_pipeline_split_is_accepted_when_explicit():
    ParallelLayout(pp=3, pipeline_layers=[10, 9, 9]).validate(3, **DENSE)
    message = only_problem(ParallelLayout(pp=3, pipeline_layers=[10, 9, 8]), 3)
    assert "sums to 27, not num_layers=28" in message
    message = only_problem(ParallelLayout(pp=3, pipeline_layers=[14, 14]), 3)
    assert "has 2 entries but there are 3" in message


def test_a_stage_may_hold_no_layers():
    """The model builds 0-layer (virtual) stages (megatron's pipeline layout), so the rule allows them."""
    layout = ParallelLayout(pp=2, vpp=2, pipeline_layers=(3, 0, 0, 1)).validate(2, **dict(DENSE, num_layers=4))
    assert layout.stage_layers(4) == [3, 0, 0, 1]
    ParallelLayout(pp=2, pipeline_layers=(4, 0)).validate(2, **dict(DENSE, num_layers=4))
    message = only_problem(ParallelLayout(pp=2, pipeline_layers=(5, -1)), 2, num_layers=4)
    assert "negative layer count" in message


def test_experts_must_be_divisible_by_ep():
    message = only_problem(ParallelLayout(ep=3), 3, num_experts=128)
    assert "num_experts=128 is not divisible by ep=3" in message
    message = only_problem(ParallelLayout(ep=2), 2)
    assert "ep=2 but the model has no experts" in message


def test_moe_with_tensor_parallelism_needs_sequence_parallelism():
    message = only_problem(ParallelLayout(tp=2, ep=2), 4, num_experts=8)
    assert "MoE model with tp=2 needs sequence_parallel=True" in message


def test_expert_layout_must_fit_the_world():
    message = only_problem(ParallelLayout(tp=1, ep=4, etp=2), 4, num_experts=8)
    assert "etp·ep·pp = 2·4·1 = 8" in message


def test_sequence_length_must_be_divisible_by_2cp_and_tp_with_sequence_parallel():
    message = only_problem(ParallelLayout(cp=2), 2, seq_length=4098)
    assert "seq_length=4098 is not divisible by 4 (2·cp = 4)" in message and "use seq_length=4096 or 4100" in message
    message = only_problem(ParallelLayout(tp=2, cp=2, sequence_parallel=True), 4, seq_length=4100)
    assert "not divisible by 8" in message and "tp = 2" in message
    message = only_problem(ParallelLayout(tp=2, sequence_parallel=True), 2, seq_length=4097)
    assert "sequence parallelism splits every sequence over the TP ranks" in message
    ParallelLayout(tp=2, cp=2, sequence_parallel=True).validate(4, seq_length=4096, **DENSE)
    ParallelLayout(tp=2).validate(2, seq_length=4097, **DENSE)  # no constraint without CP/SP


def test_deepstack_layers_must_be_on_the_first_stage():
    dims = dict(DENSE, num_layers=4)
    message = only_problem(ParallelLayout(pp=2), 2, **dims)
    assert "LLM layers 0..2" in message and "first pipeline stage, which holds only 2" in message
    ParallelLayout(pp=2, pipeline_layers=[3, 1]).validate(2, **dims)
    ParallelLayout(pp=2).validate(2, deepstack_layers=0, **dims)  # text-only model
    message = only_problem(ParallelLayout(pp=2, vpp=2), 2, num_layers=8)
    assert "first virtual chunk of pipeline rank 0, which holds only 2" in message
    ParallelLayout(pp=4).validate(4, **DENSE)  # 7 layers on stage 0


def test_interleaving_needs_microbatches_divisible_by_pp():
    message = only_problem(ParallelLayout(pp=4, vpp=7), 4, num_microbatches=6, deepstack_layers=1)
    assert "num_microbatches=6 (per step and DP rank) is not divisible by pp=4" in message
    ParallelLayout(pp=4, vpp=7).validate(4, num_microbatches=8, deepstack_layers=1, **DENSE)
    ParallelLayout(pp=4).validate(4, num_microbatches=6, **DENSE)  # plain 1F1B has no such rule


def test_degree_sanity():
    assert "vpp=1" in only_problem(ParallelLayout(pp=2, vpp=1), 2)
    assert "needs pp >= 2" in only_problem(ParallelLayout(vpp=2), 1)
    assert "tp=0 must be at least 1" in only_problem(ParallelLayout(tp=0), 1)
    assert "sequence_parallel=True needs tp > 1" in only_problem(ParallelLayout(sequence_parallel=True), 1)


def test_all_problems_are_reported_together():
    found = problems_of(ParallelLayout(tp=3, pp=5, ep=2), 7, num_experts=9, seq_length=10)
    assert len(found) >= 5  # world size, heads, groups, layers, experts (and expert span)


def test_vision_heads_must_be_divisible_by_tp():
    message = only_problem(ParallelLayout(tp=4), 4, vision_heads=6)
    assert "tp=4 does not divide the 6 ViT heads" in message
    ParallelLayout(tp=4).validate(4, vision_heads=16, **DENSE)


def test_model_config_gives_the_sizes_the_rules_need():
    from qwen3vl.model.presets import get_preset

    dims = get_preset("tiny-moe").layout_dims()
    assert dims == dict(num_attention_heads=4, num_query_groups=2, num_layers=4, num_experts=8,
                        deepstack_layers=3, vision_heads=4)
    with pytest.raises(LayoutError, match="first pipeline stage, which holds only 2"):
        ParallelLayout(pp=2).validate(2, **dims)


def test_docs_table_is_the_rule_list():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "parallel.md").read_text()
    table = ["| rule | why |", "| --- | --- |"] + [f"| {rule} | {why} |" for rule, why in RULES]
    assert "\n".join(table) in docs, "docs/parallel.md's rule table differs from qwen3vl.parallel.layout.RULES"


@pytest.mark.parametrize("layout, multiple", [
    (ParallelLayout(), 1), (ParallelLayout(cp=2), 4), (ParallelLayout(tp=4, sequence_parallel=True), 4),
    (ParallelLayout(tp=2, cp=4, sequence_parallel=True), 16), (ParallelLayout(tp=2, cp=4), 8)])
def test_sequence_multiple_is_what_the_sequence_rule_enforces(layout, multiple):
    assert layout.sequence_multiple == multiple
    dims = dict(num_attention_heads=8, num_query_groups=8, num_layers=8)
    world = layout.model_parallel_size
    assert not any("seq_length" in p for p in layout.problems(world, seq_length=8 * multiple, **dims))
    if multiple > 1:
        assert any("seq_length" in p for p in layout.problems(world, seq_length=8 * multiple + 1, **dims))
