"""The FLOP count against independent ones, forward and backward, with frozen parts: torch's
FlopCounterMode on (1) a plain-torch Qwen3-VL-shaped model that computes exactly the work the count
describes (packed causal attention per segment, ViT attention per frame group, DeepStack) and (2)
transformers' tiny Qwen3-VL (the real architecture; weight matmuls)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qwen3vl.model.presets import get_preset
from qwen3vl.train.flops import FlopDims, batch_flops, mfu, peak_memory_bytes, peak_tflops, row_flops

# A small, lopsided model so that every term has a different size (a missing term cannot hide).
DIMS = FlopDims(hidden=24, layers=3, heads=4, kv_heads=2, head_dim=8, ffn=40, vocab=50, v_depth=3,
                v_hidden=16, v_ffn=36, patch_dim=12, merge=2, num_deepstack=2)


class ReferenceModel(nn.Module):
    """Plain torch; causal attention is computed one query at a time so it does s(s+1)/2 pairs."""

    def __init__(self, d: FlopDims) -> None:
        super().__init__()
        self.d = d
        lin = lambda i, o, bias=True: nn.Linear(i, o, bias=bias)  # noqa: E731
        self.patch = lin(d.patch_dim, d.v_hidden)
        self.vit = nn.ModuleList(
            nn.ModuleDict(dict(qkv=lin(d.v_hidden, 3 * d.v_hidden), proj=lin(d.v_hidden, d.v_hidden),
                               fc1=lin(d.v_hidden, d.v_ffn), fc2=lin(d.v_ffn, d.v_hidden)))
            for _ in range(d.v_depth))
        wide = d.v_hidden * d.merge ** 2
        def merger():  # LayerNorm first, as in Qwen3-VL
            return nn.Sequential(nn.LayerNorm(wide), lin(wide, wide), nn.GELU(), lin(wide, d.hidden))

        self.merger = merger()
        self.deepstack = nn.ModuleList(merger() for _ in range(d.num_deepstack))
        self.embed = nn.Embedding(d.vocab, d.hidden)
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        self.llm = nn.ModuleList(nn.ModuleDict(dict(
            q=lin(d.hidden, q, False), k=lin(d.hidden, kv, False), v=lin(d.hidden, kv, False),
            o=lin(q, d.hidden, False), gate=lin(d.hidden, d.ffn, False), up=lin(d.hidden, d.ffn, False),
            down=lin(d.ffn, d.hidden, False)))
            for _ in range(d.layers))
        self.head = lin(d.hidden, d.vocab, False)

    def vision(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]):
        x, heads, feats = self.patch(pixels), 4, []
        groups = [h * w for t, h, w in grids for _ in range(t)]
        for i, blk in enumerate(self.vit):
            q, k, v = blk["qkv"](x).chunk(3, dim=-1)
            outs, start = [], 0
            for g in groups:  # full attention within each frame group only
                split = lambda z: z[start:start + g].reshape(g, heads, -1).transpose(0, 1)  # noqa: E731
                a = torch.softmax(split(q) @ split(k).transpose(1, 2), dim=-1) @ split(v)
                outs.append(a.transpose(0, 1).reshape(g, -1))
                start += g
            x = x + blk["proj"](torch.cat(outs))
            x = x + blk["fc2"](torch.relu(blk["fc1"](x)))
            if i < len(self.deepstack):
                feats.append(self.deepstack[i](x.reshape(-1, 4 * x.shape[-1])))
        return self.merger(x.reshape(-1, 4 * x.shape[-1])), feats

    def forward(self, tokens, visual, segments, pixels, grids):
        h = self.embed(tokens)
        feats = []
        if grids:
            merged, feats = self.vision(pixels, grids)
            h = h.index_put((visual,), merged)
        d = self.d
        for i, blk in enumerate(self.llm):
            q = blk["q"](h).reshape(-1, d.heads, d.head_dim).transpose(0, 1)
            k = blk["k"](h).reshape(-1, d.kv_heads, d.head_dim).transpose(0, 1).repeat_interleave(2, dim=0)
            v = blk["v"](h).reshape(-1, d.kv_heads, d.head_dim).transpose(0, 1).repeat_interleave(2, dim=0)
            rows, start = [], 0
            for s in segments:
                for j in range(s):  # query j of the segment sees keys 0..j
                    kk, vv = k[:, start:start + j + 1], v[:, start:start + j + 1]
                    p = torch.softmax(q[:, start + j:start + j + 1] @ kk.transpose(1, 2), dim=-1)
                    rows.append(p @ vv)
                start += s
            attn = torch.cat(rows, dim=1).transpose(0, 1).reshape(-1, d.heads * d.head_dim)
            h = h + blk["o"](attn)
            h = h + blk["down"](torch.nn.functional.silu(blk["gate"](h)) * blk["up"](h))
            if i < len(feats):
                h = h.index_put((visual,), h[visual] + feats[i])
        return self.head(h)


def _row(grids, text_lengths, seed=0):
    """A packed row: segment i = text_lengths[i] text tokens + the visual tokens of grids[i] (if any)."""
    g = torch.Generator().manual_seed(seed)
    segments, visual = [], []
    pos = 0
    for i, n_text in enumerate(text_lengths):
        n_vis = (lambda t, h, w: t * h * w // 4)(*grids[i]) if i < len(grids) else 0
        visual += list(range(pos + 1, pos + 1 + n_vis))
        segments.append(n_text + n_vis)
        pos += n_text + n_vis
    tokens = torch.randint(0, DIMS.vocab, (pos,), generator=g)
    patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(patches, DIMS.patch_dim, generator=g)
    return tokens, torch.tensor(visual, dtype=torch.long), segments, pixels, list(grids)


def _counted(model: ReferenceModel, trainable: set[str], row) -> int:
    parts = {"vision": [model.patch, model.vit], "merger": [model.merger], "deepstack_merger": [model.deepstack],
             "llm": [model.embed, model.llm, model.head]}
    for part, modules in parts.items():
        for m in modules:
            m.requires_grad_("all" in trainable or part in trainable)
    with FlopCounterMode(display=False) as counter:
        logits = model(*row)
        loss = logits.float().logsumexp(-1).sum()
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny matmuls: threads only add contention on a shared 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReferenceModel(DIMS)


MIXED = dict(grids=[(1, 4, 6), (2, 2, 4)], text_lengths=[3, 4, 6])  # an image, a video, a text sample


@pytest.mark.parametrize("trainable", [{"all"}, {"merger", "deepstack_merger"}, {"llm"}, {"vision"},
                                       {"deepstack_merger"}])
def test_count_matches_flop_counter_forward_and_backward(model, trainable):
    row = _row(**MIXED)
    ours = row_flops(DIMS, row[2], row[4], trainable)
    assert ours.total == _counted(model, trainable, row)


def test_text_only_row_under_stage0_freeze_is_forward_only(model):
    row = _row(grids=[], text_lengths=[6, 3])
    ours = row_flops(DIMS, row[2], [], {"merger", "deepstack_merger"})
    assert ours.backward == 0
    assert ours.total == _counted(model, {"merger", "deepstack_merger"}, row)


def test_frozen_parts_cost_less_than_trained_ones():
    segs, grids = [40, 30], [(1, 4, 4)]
    full = row_flops(DIMS, segs, grids, {"all"})
    s0 = row_flops(DIMS, segs, grids, {"merger", "deepstack_merger"})
    assert full.by_part["vision"] > 2.5 * s0.by_part["vision"]  # ViT: 3x vs forward only
    assert s0.by_part["llm"] == pytest.approx(2 / 3 * full.by_part["llm"])  # input gradients only
    assert s0.by_part["llm_attention"] == full.by_part["llm_attention"]  # attention has no weights
    # The mergers start with a trained LayerNorm: their linears need both gradients even in stage 0.
    merger = (DIMS.merger_fc1_per_token() + DIMS.merger_fc2_per_token()) * 4
    assert s0.by_part["merger"] == full.by_part["merger"] == 3 * merger


def test_packed_attention_counts_segments_not_the_row():
    one = row_flops(DIMS, [300], [], {"all"})
    packed = row_flops(DIMS, [100, 100, 100], [], {"all"})
    attn_pair = DIMS.llm_attention_per_pair() * DIMS.layers * 3  # fwd + bwd
    # Same tokens, so the only difference is attention: Σ s_i(s_i+1)/2 versus s(s+1)/2.
    assert one.total - packed.total == pytest.approx(attn_pair * (300 * 301 / 2 - 3 * 100 * 101 / 2))
    assert packed.by_part["llm_attention"] == attn_pair * 3 * 100 * 101 / 2
    assert row_flops(DIMS, [100, 50, 150], [], {"all"}).total == row_flops(DIMS, [150, 100, 50], [], {"all"}).total


def test_vit_attention_grows_with_patches_squared_per_frame_group():
    def vision(grid):
        parts = row_flops(DIMS, [40], [grid], {"all"}).by_part
        return parts["vision"] + parts["vision_attention"]

    image, bigger, video = vision((1, 8, 8)), vision((1, 16, 16)), vision((4, 8, 8))
    per_pair = DIMS.v_depth * 4 * DIMS.v_hidden * 3
    def linear(p):  # blocks 3x (fwd, dX, dW); the patch embedding 2x (no dX for pixels)
        return 3 * p * DIMS.v_depth * DIMS.vit_block_linear_per_patch() + 2 * p * 2 * DIMS.patch_dim * DIMS.v_hidden

    assert image == pytest.approx(linear(64) + per_pair * 64 ** 2)
    assert bigger == pytest.approx(linear(256) + per_pair * 256 ** 2)
    assert video == pytest.approx(linear(256) + per_pair * 4 * 64 ** 2)  # frame groups, not (4·64)²


@pytest.fixture(scope="module")
def hf_tiny():
    from qwen3vl.model.interop.hf_reference import build_hf_model

    config = get_preset("tiny")
    return config, build_hf_model(config)


@pytest.mark.parametrize("trainable", [{"all"}, {"merger", "deepstack_merger"}, {"vision"}])
def test_count_matches_transformers_qwen3vl_forward_and_backward(hf_tiny, trainable):
    """The real architecture (transformers' tiny Qwen3-VL) under FlopCounterMode, images and a video.

    On CPU FlopCounterMode does not see the sdpa attention kernels, so the weight matmuls are compared
    (everything but the attention parts of the count): this checks the sizes taken from the config.
    """
    from qwen3vl_testing.model_cases import hf_forward, make_case

    config, hf = hf_tiny
    dims = FlopDims.from_model_config(config)
    for case in ("images", "image_video"):
        sample = make_case(case, config)
        for name, p in hf.named_parameters():
            part = ("llm" if "language_model" in name or "lm_head" in name else
                    "deepstack_merger" if "deepstack" in name else "merger" if "merger" in name else "vision")
            p.requires_grad_("all" in trainable or part in trainable)
        with FlopCounterMode(display=False) as counter:
            loss = hf_forward(hf, sample).logits.float().logsumexp(-1).sum()
            loss.backward()
        hf.zero_grad(set_to_none=True)
        ours = row_flops(dims, [sample.input_ids.numel()], [g for _, g, _ in sample.media], trainable).by_part
        assert counter.get_total_flops() == sum(v for k, v in ours.items() if not k.endswith("attention"))


def test_dims_from_presets_and_moe_layers():
    dense = FlopDims.from_model_config(get_preset("8B"))
    assert (dense.hidden, dense.layers, dense.v_depth, dense.moe_layers) == (4096, 36, 27, ())
    moe = FlopDims.from_model_config(get_preset("30B-A3B"))
    assert moe.moe_layers == tuple(range(48))
    # Per token the MoE layer runs the router and 8 of 128 experts: ~3B active parameters in all.
    active = sum(moe.llm_layer_linear_per_token(i) for i in range(moe.layers)) / 2
    assert 2.5e9 < active + moe.hidden * moe.vocab < 3.5e9


def test_batch_flops_reads_the_packed_batch():
    from qwen3vl.data.batch import PackedBatch

    T = 32
    batch = PackedBatch(
        tokens=torch.zeros(T, dtype=torch.long), labels=torch.zeros(T, dtype=torch.long),
        position_ids=torch.zeros(3, T, dtype=torch.long), mm_token_type_ids=torch.zeros(T, dtype=torch.long),
        cu_seqlens=torch.tensor([0, 10, 17, 17], dtype=torch.int32),
        cu_seqlens_padded=torch.tensor([0, 12, 20, 32], dtype=torch.int32),
        sample_loss_tokens=torch.tensor([9, 6, 0]), pixel_values=torch.zeros(0, 1536),
        grid_thw=torch.zeros(0, 3, dtype=torch.long), pad_multiple=4)
    assert batch_flops(DIMS, batch).total == row_flops(DIMS, [10, 7], []).total


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", precision="fp32") is None
    assert peak_tflops("Some Unknown Accelerator") is None
    if not torch.cuda.is_available():
        assert peak_tflops() is None
    assert mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert mfu(1e12, None) is None
    assert peak_memory_bytes() > 10 * 2 ** 20  # this process holds torch: well above 10 MiB


def _rank_memory() -> tuple[list[float], float]:
    from qwen3vl.train.flops import peak_memory_bytes, peak_memory_per_rank

    everyone = peak_memory_per_rank()
    return everyone, peak_memory_bytes() / 2 ** 30


def test_peak_memory_is_reported_for_every_rank():
    from qwen3vl_testing.distributed import run_distributed

    from qwen3vl.train.flops import peak_memory_per_rank

    assert len(peak_memory_per_rank()) == 1  # no process group: this process only
    results = run_distributed(_rank_memory, world_size=2)
    lists = [r[0] for r in results]
    assert lists[0] == lists[1] and len(lists[0]) == 2  # every rank gets the same list, in rank order
    for rank, (_, own) in enumerate(results):
        assert 0.05 < lists[0][rank] <= own < lists[0][rank] + 0.05  # entry r is rank r's own peak (GiB)
