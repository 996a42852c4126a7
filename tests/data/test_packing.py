"""Packing: best-fit-decreasing, the packed row layout and its invariants, the online packer."""
import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl.data.batch import IGNORE_INDEX, IMAGE, TEXT
from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.encoded_sample import EncodedSample
from qwen3vl.data.packing import OnlinePacker, best_fit_decreasing, build_row
from qwen3vl.data.processing_config import ProcessingConfig
from qwen3vl.data.sample_format import RawSample


def test_best_fit_decreasing_small_example():
    # Longest first, each into the open group it leaves fullest.
    assert best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], [0] * 7, capacity=8) == [[0, 2], [1, 3, 6], [4, 5]]


def test_best_fit_decreasing_respects_the_patch_budget():
    assert best_fit_decreasing([1, 1, 1], [5, 5, 5], capacity=8, max_patches=10) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="exceeds capacity"):
        best_fit_decreasing([9], [0], capacity=8)


def test_best_fit_decreasing_places_every_item_once_within_both_budgets():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, 500).tolist()
    patches = rng.integers(0, 300, 500).tolist()
    groups = best_fit_decreasing(lengths, patches, capacity=2048, max_patches=1024)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(sum(lengths[i] for i in g) <= 2048 and sum(patches[i] for i in g) <= 1024 for g in groups)


# --- rows of real encoded samples ---------------------------------------------------------------------

def png(h, w, seed) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def samples() -> list[EncodedSample]:
    """A mix of kinds with small images (min_pixels lowered so the row stays short)."""
    cfg = ProcessingConfig(seq_length=512, min_pixels=1024, max_pixels=128 * 128, video_min_pixels=1024,
                           video_max_pixels=64 * 64 * 4)
    enc = SampleEncoder(cfg=cfg)
    media = {f"{i}.png": png(32 + 32 * (i % 3), 64, i) for i in range(8)}
    metas = [
        {"kind": "caption", "images": ["0.png", "1.png"], "text": "Two small noisy squares."},
        {"kind": "text", "text": "A plain text document about packing rows of tokens."},
        {"kind": "conversation", "messages": [{"role": "user", "content": [{"image": "2.png"}, {"text": "And?"}]},
                                              {"role": "assistant", "content": "Noise."}]},
        {"kind": "video", "video": {"frames": [f"{i}.png" for i in (3, 3, 3, 3, 3)], "fps": 2.0}, "text": "Still."},
        {"kind": "interleaved", "content": [{"text": "Look:"}, {"image": "4.png"}, {"text": "then"},
                                            {"image": "5.png"}]},
        {"kind": "text", "text": "Short."},
    ]
    return [s for i, m in enumerate(metas) for s in enc.encode(RawSample(f"k{i}", "s", m, media))]


def visual_runs(types: torch.Tensor) -> list[int]:
    runs, count = [], 0
    for t in types.tolist() + [TEXT]:
        if t != TEXT:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs


@pytest.mark.parametrize("pad_multiple", [1, 4, 8])
def test_packed_row_invariants(samples, pad_multiple):
    row = build_row(samples, seq_length=512, pad_multiple=pad_multiple)
    row.validate()
    starts, ends = row.cu_seqlens_padded[:-1].tolist(), row.cu_seqlens_padded[1:].tolist()
    reals = (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist()
    assert row.num_segments == len(samples) + 1 and reals[-1] == 0  # trailing pad segment
    assert all((e - s) % pad_multiple == 0 and r <= e - s for s, e, r in zip(starts, ends, reals))
    # Visual positions, grids and pixels: counts agree and grid order is token order.
    assert int(row.visual_mask.sum()) == int((row.grid_thw.prod(-1) // 4).sum())
    per_frame = [int(h * w // 4) for t, h, w in row.grid_thw.tolist() for _ in range(int(t))]
    assert visual_runs(row.mm_token_type_ids) == per_frame
    assert torch.equal(row.pixel_values, torch.cat([s.pixel_values for s in samples]))
    for s, start, real, n in zip(samples, starts, reals, row.sample_loss_tokens.tolist()):
        seg = slice(start, start + real)
        assert real == s.length and n == s.num_loss_tokens
        assert torch.equal(row.tokens[seg], s.tokens)
        assert torch.equal(row.position_ids[:, seg], s.position_ids) and row.position_ids[:, start].eq(0).all()
        # Labels never cross samples: every target is the next token of the same sample.
        labels = row.labels[seg]
        assert labels[-1] == IGNORE_INDEX
        kept = labels[:-1] != IGNORE_INDEX
        assert torch.equal(labels[:-1][kept], row.tokens[seg][1:][kept])
    assert int(row.loss_mask().sum()) == sum(s.num_loss_tokens for s in samples)
    assert not row.loss_mask()[~row.real_token_mask()].any()


def test_a_full_row_has_no_tail_segment(samples):
    text = next(s for s in samples if not s.is_multimodal)
    row = build_row([text], seq_length=text.length, pad_multiple=1)
    assert row.num_segments == 1 and int(row.cu_seqlens[-1]) == text.length
    with pytest.raises(ValueError, match="the row has"):
        build_row(samples, seq_length=64, pad_multiple=1)


# --- the online packer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CountedMedium:
    """Patches that are counted, never written: the packer only counts them, and filling real 1536-wide
    rows would dominate the test time (the row's pixel tensor stays uninitialised)."""

    num_patches: int

    def write(self, out) -> None:
        pass


def fake_sample(index: int, length: int, patches: int = 0) -> EncodedSample:
    """Tokens carry the sample index, so rows show which samples they hold."""
    tokens = torch.full((length,), index, dtype=torch.long)
    types = torch.zeros(length, dtype=torch.long)
    types[1:1 + patches // 4] = IMAGE
    grid = torch.tensor([[1, 2, 2 * (patches // 4)]]) if patches else torch.zeros(0, 3, dtype=torch.long)
    labels = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
    return EncodedSample(tokens, labels, types, torch.zeros(3, length, dtype=torch.long),
                         (CountedMedium(patches),) if patches else (), grid, "fake", str(index))


def synthetic_mix(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(length, patches): log-normal lengths, one sample in three multimodal with up to half of its
    tokens visual (64..1024 visual tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(700), 1.0, n), 16, 8192).astype(int)
    patches = np.where(rng.random(n) < 1 / 3, 4 * np.minimum(lengths // 2, rng.integers(64, 1024, n)), 0)
    return list(zip(lengths.tolist(), patches.tolist()))


def run_packer(mix, **kwargs) -> tuple[OnlinePacker, list]:
    packer = OnlinePacker(**kwargs)
    rows = []
    for i, (length, patches) in enumerate(mix):
        packer.add(fake_sample(i, length, patches))
        rows += packer.pop_ready()
    rows += packer.flush()
    return packer, rows


def test_online_packer_fills_8k_rows_at_least_98_percent():
    mix = synthetic_mix(2500)
    packer, rows = run_packer(mix, seq_length=8192, pad_multiple=8, buffer_size=256, max_patches=16384)
    assert packer.stats.efficiency >= 0.98, packer.stats
    assert packer.stats.samples == len(mix) and not packer.dropped and len(packer) == 0
    seen = torch.cat([r.tokens[r.real_token_mask()] for r in rows]).bincount(minlength=len(mix))
    assert seen.tolist() == [length for length, _ in mix]  # every sample exactly once, whole
    for r in rows:
        assert r.cu_seqlens_padded[-1] == 8192 and r.pixel_values.shape[0] <= 16384


def test_online_packer_is_a_deterministic_function_of_its_input():
    mix = synthetic_mix(700, seed=1)
    _, first = run_packer(mix, seq_length=8192, pad_multiple=4, buffer_size=64)
    _, second = run_packer(mix, seq_length=8192, pad_multiple=4, buffer_size=64)
    assert len(first) == len(second)
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.cu_seqlens, b.cu_seqlens)
               for a, b in zip(first, second))


def test_online_packer_drops_and_counts_what_cannot_fit():
    packer = OnlinePacker(seq_length=1024, pad_multiple=8, buffer_size=4, max_patches=64)
    packer.add(fake_sample(0, 1020, patches=8))  # pads to 1024: fits
    packer.add(fake_sample(1, 1025, patches=8))  # pads to 1032
    packer.add(fake_sample(2, 2000))
    packer.add(fake_sample(3, 100, patches=128))
    assert dict(packer.dropped) == {"too_long_multimodal": 1, "too_long_text": 1, "too_many_patches": 1}
    assert len(packer.flush()) == 1
