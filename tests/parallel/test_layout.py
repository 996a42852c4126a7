"""Every ParallelLayout rule, checked without any process group (validate is pure)."""
import pytest

from qwen3vl.parallel.layout import LayoutError, ModelDims, ParallelLayout

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
    ParallelLayout(pp=3).validate(3, pipeline_layers=[10, 9, 9], **DENSE)
    message = only_problem(ParallelLayout(pp=3), 3, pipeline_layers=[10, 9, 8])
    assert "sums to 27, not num_layers=28" in message
    message = only_problem(ParallelLayout(pp=3), 3, pipeline_layers=[14, 14])
    assert "has 2 entries but there are 3" in message


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
    assert "seq_length=4098 is not divisible by 4 = 2·cp = 4" in message
    message = only_problem(ParallelLayout(tp=2, cp=2, sequence_parallel=True), 4, seq_length=4100)
    assert "not divisible by 8" in message and "tp = 2" in message
    ParallelLayout(tp=2, cp=2, sequence_parallel=True).validate(4, seq_length=4096, **DENSE)
    ParallelLayout(tp=2).validate(2, seq_length=4097, **DENSE)  # no constraint without CP/SP


def test_deepstack_layers_must_be_on_the_first_stage():
    dims = dict(DENSE, num_layers=4)
    message = only_problem(ParallelLayout(pp=2), 2, **dims)
    assert "LLM layers 0..2" in message and "first pipeline stage, which holds only 2" in message
    ParallelLayout(pp=2).validate(2, pipeline_layers=[3, 1], **dims)
    ParallelLayout(pp=2).validate(2, deepstack_layers=0, **dims)  # text-only model
    message = only_problem(ParallelLayout(pp=2, vpp=2), 2, num_layers=8)
    assert "first virtual chunk of pipeline rank 0, which holds only 2" in message
    ParallelLayout(pp=4).validate(4, **DENSE)  # 7 layers on stage 0


def test_interleaving_needs_microbatches_divisible_by_pp():
    message = only_problem(ParallelLayout(pp=4, vpp=7), 4, num_microbatches=6, deepstack_layers=1)
    assert "num_microbatches=6 is not divisible by pp=4" in message
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


def test_model_dims_entry_point():
    dims = ModelDims(num_attention_heads=16, num_query_groups=8, num_layers=28, pipeline_layers=(15, 13))
    ParallelLayout(pp=2).validate_for(2, dims, seq_length=8192)
    with pytest.raises(LayoutError, match="sums to 28"):
        ParallelLayout(pp=2).validate_for(2, ModelDims(16, 8, 29, pipeline_layers=(15, 13)))


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
