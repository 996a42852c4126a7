"""Context parallelism: the zig-zag index, per-rank model inputs, and CP=2 attention against CP=1."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen3vl.data.batch import IGNORE_INDEX, IMAGE, PackedBatch
from qwen3vl.model.attention import PackedCoreAttention
from qwen3vl.parallel.micro_batch import build_packed_seq_params
from qwen3vl.parallel.context_parallel import model_inputs, zigzag_index
from qwen3vl_testing.distributed import run_distributed

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def cumulative(lengths):
    return torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)


def tiny_batch(real=(5, 9, 3, 0), padded=(8, 12, 4, 4), image_at=(9, 10)) -> PackedBatch:
    """A valid packed row: three samples, one 2-token image (grid 1x2x4) in the second, a padding tail."""
    T = sum(padded)
    g = torch.Generator().manual_seed(0)
    mm = torch.zeros(T, dtype=torch.long)
    mm[list(image_at)] = IMAGE
    labels = torch.randint(0, 100, (T,), generator=g)
    labels[mm != 0] = IGNORE_INDEX
    batch = PackedBatch(
        tokens=torch.randint(0, 100, (T,), generator=g), labels=labels,
        position_ids=torch.arange(3 * T).reshape(3, T), mm_token_type_ids=mm,
        cu_seqlens=cumulative(real), cu_seqlens_padded=cumulative(padded),
        sample_loss_tokens=torch.tensor([4, 6, 2, 0]), pixel_values=torch.randn(8, 1536, generator=g),
        grid_thw=torch.tensor([[1, 2, 4]]), pad_multiple=4)
    batch.validate()
    return batch


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_zigzag_index_partitions_every_segment_evenly(cp_size):
    padded = [8 * cp_size, 0, 2 * cp_size, 6 * cp_size]
    bounds = cumulative(padded)
    parts = [zigzag_index(bounds, cp_size, r) for r in range(cp_size)]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(int(bounds[-1])))
    for rank, part in enumerate(parts):
        assert part.numel() == int(bounds[-1]) // cp_size
        offset = 0
        for start, length in zip(bounds[:-1].tolist(), padded):
            chunk = length // (2 * cp_size)
            expected = [start + rank * chunk + i for i in range(chunk)]
            expected += [start + (2 * cp_size - 1 - rank) * chunk + i for i in range(chunk)]
            assert part[offset:offset + 2 * chunk].tolist() == expected
            offset += 2 * chunk
    # Causal work (keys read per query = position in segment + 1) is the same on every rank.
    work = [sum(int(p) - s + 1 for p in part for s in bounds[:-1].tolist() if p >= s)
            for part in [zigzag_index(cumulative([4 * cp_size]), cp_size, r) for r in range(cp_size)]]
    assert len(set(work)) == 1


def test_zigzag_index_rejects_unaligned_segments():
    with pytest.raises(ValueError, match="multiples of 2\\*CP=4"):
        zigzag_index(cumulative([8, 6]), 2, 0)


def test_model_inputs_cp1_is_the_whole_row():
    batch = tiny_batch()
    inputs = model_inputs(batch)
    assert torch.equal(inputs.input_ids, batch.tokens) and torch.equal(inputs.labels, batch.labels)
    assert torch.equal(inputs.position_ids, batch.position_ids)
    assert torch.equal(inputs.gather_index, torch.arange(batch.seq_length))
    assert torch.equal(inputs.loss_token_counts, batch.token_sample_loss_tokens())
    expected_visual = torch.full((batch.seq_length,), -1)
    expected_visual[[9, 10]] = torch.tensor([0, 1])
    assert torch.equal(inputs.visual_index, expected_visual)
    assert inputs.packed_seq_params.cu_seqlens_q_padded.tolist() == batch.cu_seqlens_padded.tolist()
    assert inputs.pixel_values is batch.pixel_values and inputs.grid_thw is batch.grid_thw


def test_a_micro_batch_can_leave_its_pixels_on_the_host():
    # A training step moves all its micro-batches to the device at once; their pixels, most of their bytes,
    # stay on the host until the vision tower runs (the model moves them, under CP only this rank's share).
    inputs = model_inputs(tiny_batch())
    moved = inputs.to("meta", media=False)
    assert moved.pixel_values is inputs.pixel_values
    assert {t.device.type for t in (moved.input_ids, moved.labels, moved.grid_thw, moved.visual_index,
                                    moved.packed_seq_params.cu_seqlens_q)} == {"meta"}
    assert inputs.to("meta").pixel_values.device.type == "meta"


def _training_converter_body() -> dict:
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.train.app import microbatch_converter

    initialize_parallel(ParallelLayout())
    mb = microbatch_converter(torch.device("meta"))(tiny_batch())
    return {"pixels": mb.pixel_values.device.type, "tokens": mb.input_ids.device.type}


def test_the_training_step_keeps_pixels_on_the_host_until_the_vision_tower():
    assert run_distributed(_training_converter_body, world_size=1)[0] == {"pixels": "cpu", "tokens": "meta"}


def test_model_inputs_cp2_cuts_every_field_with_one_index():
    batch = tiny_batch()
    shards = [model_inputs(batch, cp_rank=r, cp_size=2) for r in range(2)]
    index = torch.cat([s.gather_index for s in shards])
    assert torch.equal(index.sort().values, torch.arange(batch.seq_length))
    full_visual = model_inputs(batch).visual_index
    for shard in shards:
        i = shard.gather_index
        assert torch.equal(shard.input_ids, batch.tokens[i])
        assert torch.equal(shard.labels, batch.labels[i])
        assert torch.equal(shard.position_ids, batch.position_ids[:, i])
        assert torch.equal(shard.loss_token_counts, batch.token_sample_loss_tokens()[i])
        assert torch.equal(shard.visual_index, full_visual[i])
        # Global cu_seqlens, as transformer-engine expects under CP.
        assert shard.packed_seq_params.cu_seqlens_q.tolist() == batch.cu_seqlens.tolist()


# --- CP=2 attention, run on 2 gloo ranks ------------------------------------------------------------

def cp_attention_rank(mask_type_name: str, real, padded):
    """Every rank builds the same full row, runs CP=1 locally as the reference and CP=2 on its zig-zag
    rows; returns the largest output and q/k/v gradient differences on its rows."""
    cp_size, rank = dist.get_world_size(), dist.get_rank()
    mask_type = AttnMaskType[mask_type_name]
    cu, cu_padded = cumulative(real), cumulative(padded)
    T = int(cu_padded[-1])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(T, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    v = torch.randn(T, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    upstream = torch.randn(T, HEADS * HEAD_DIM, generator=g, dtype=torch.float64)

    def attention(cp):
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=HEADS,
                                   num_query_groups=KV_HEADS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                                   hidden_dropout=0.0, context_parallel_size=cp, use_cpu_initialization=True)
        return PackedCoreAttention(config, 1, mask_type, "self", kernel="sdpa",
                                   pg_collection=SimpleNamespace(cp=dist.group.WORLD))

    params = build_packed_seq_params(cu, cu_padded)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out_full = attention(1)(*full, None, packed_seq_params=params)
    out_full.backward(upstream)

    index = zigzag_index(cu_padded, cp_size, rank)
    local = [x[index].clone().requires_grad_() for x in (q, k, v)]
    out_local = attention(cp_size)(*local, None, packed_seq_params=build_packed_seq_params(cu, cu_padded))
    out_local.backward(upstream[index])
    diffs = [float((out_local - out_full[index]).detach().abs().max())]
    diffs += [float((mine.grad - ref.grad[index]).abs().max()) for mine, ref in zip(local, full)]
    return diffs


@pytest.mark.parametrize("mask_type", ["causal", "no_mask"])
def test_cp2_attention_matches_cp1(mask_type):
    from qwen3vl_testing.distributed import run_distributed

    # Segments of different lengths; real lengths ending inside the first chunk, the second chunk, and
    # exactly at a chunk boundary; an all-padding tail.
    results = run_distributed(cp_attention_rank, world_size=2, mask_type_name=mask_type,
                              real=[13, 3, 8, 0], padded=[16, 8, 8, 4])
    for rank_diffs in results:
        assert max(rank_diffs) < 1e-12, rank_diffs
