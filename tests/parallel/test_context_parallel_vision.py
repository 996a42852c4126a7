"""The vision encoder split across the CP group: cost balance, embeddings and gradients vs one rank."""
import pytest
import torch
import torch.distributed as dist

from qwen3vl.parallel.context_parallel import encode_vision_across_cp, split_media_by_cost

HIDDEN = 6


def test_split_balances_patches_squared_not_image_count():
    # One 8x8 image costs 64² = 4096; four 4x4 images cost 16² = 256 each. By count the big image would
    # share a rank with one small one; by cost it gets a rank to itself.
    split = split_media_by_cost(torch.tensor([[1, 4, 4], [1, 8, 8], [1, 4, 4], [1, 4, 4], [1, 4, 4]]), 2)
    assert split.owner == [1, 0, 1, 1, 1]
    assert (split.load(0), split.load(1)) == (4096, 1024)


def test_split_cuts_videos_into_frame_groups():
    split = split_media_by_cost(torch.tensor([[3, 4, 4], [1, 4, 8]]), 2)
    assert split.grid.tolist() == [[1, 4, 4]] * 3 + [[1, 4, 8]]
    assert split.patch_start == [0, 16, 32, 48] and split.tokens == [4, 4, 4, 8]
    assert split.owner == [1, 1, 1, 0]  # 1024 vs 3·256 after the largest goes first
    whole = split_media_by_cost(torch.tensor([[3, 4, 4], [1, 4, 8]]), 2, split_videos=False)
    assert whole.grid.tolist() == [[3, 4, 4], [1, 4, 8]] and whole.cost == [768, 1024]


def tiny_encoder(seed: int = 0):
    """A linear stand-in for the ViT + mergers: per-patch projection, 2x2 merge, a merged output and two
    DeepStack outputs. Returns (encoder_fn, parameters)."""
    g = torch.Generator().manual_seed(seed)
    patch = torch.randn(1536, 8, generator=g, dtype=torch.float64).mul_(0.05).requires_grad_()
    heads = [torch.randn(32, HIDDEN, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]

    def encoder_fn(pixels, grid):
        assert pixels.shape[0] == int(grid.prod(-1).sum())
        x = (pixels @ patch).reshape(-1, 32)  # 4 consecutive patches = one merged token
        merged, *deepstack = [torch.tanh(x * (j + 1)) @ w for j, w in enumerate(heads)]
        return merged, deepstack

    return encoder_fn, [patch, *heads]


def vision_rank(grid):
    """CP-split encoding vs encoding everything on this rank; every rank owns the tokens k ≡ rank (mod CP)
    of the row for its loss, as a zig-zag shard would own some of them."""
    rank, cp_size = dist.get_rank(), dist.get_world_size()
    grid = torch.tensor(grid, dtype=torch.long).reshape(-1, 3)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    tokens = int(grid.prod(-1).sum()) // 4
    weights = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    encoder_fn, params = tiny_encoder()
    merged, deepstack = encode_vision_across_cp(encoder_fn, pixels, grid, dist.group.WORLD)
    mine = torch.arange(rank, tokens, cp_size)
    loss = sum((f[mine] * weights[mine] * (j + 1)).sum() for j, f in enumerate([merged, *deepstack]))
    loss.backward()
    split_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    ref_fn, ref_params = tiny_encoder()
    ref_merged, ref_deepstack = ref_fn(pixels, grid)
    ref_loss = sum((f * weights * (j + 1)).sum() for j, f in enumerate([ref_merged, *ref_deepstack]))
    ref_loss.backward()
    embedding_diff = max(float((a - b).detach().abs().max()) for a, b in
                         zip([merged, *deepstack], [ref_merged, *ref_deepstack]))
    encoded_units = len(split_media_by_cost(grid, cp_size).units_of(rank))
    return embedding_diff, split_grads, [p.grad for p in ref_params], encoded_units


@pytest.mark.parametrize("grid", [
    [[1, 4, 4], [2, 4, 8], [1, 2, 2], [1, 8, 4]],  # images and a video over both ranks
    [[1, 4, 4]],  # one image: rank 1 encodes nothing but joins every collective
])
def test_encode_vision_across_cp_matches_one_rank(grid):
    from qwen3vl_testing.distributed import run_distributed

    results = run_distributed(vision_rank, world_size=2, grid=grid)
    for embedding_diff, _, _, _ in results:
        assert embedding_diff < 1e-12
    summed = [sum(r[1][i] for r in results) for i in range(len(results[0][1]))]
    for mine, ref in zip(summed, results[0][2]):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    if len(grid) == 1:
        assert sorted(r[3] for r in results) == [0, 1]


def test_no_media_returns_none_without_collectives():
    assert encode_vision_across_cp(tiny_encoder()[0], torch.zeros(0, 1536), torch.zeros(0, 3, dtype=torch.long),
                                   cp_group=object()) is None
