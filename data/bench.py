"""``qwen3vl-data bench``: packed tokens per second per CPU core, and packing efficiency.

The standard mix (by sample): half captions with one 512×512 JPEG, a quarter interleaved documents
with three 512×512 JPEGs, a quarter text documents (log-normal lengths, median ~800 tokens). The
loader runs in this process with one torch thread, exactly as in training (read, decode, resize,
patchify, tokenize, MRoPE positions, pack), and the rate is real (non-pad) tokens of the packed rows
divided by the CPU time this process used: contention from other processes on a shared machine
does not distort it, and "per core" is literal. Efficiency is the non-pad fraction of the rows.
"""
from __future__ import annotations

import io
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from qwen3vl.data.loader import LoaderConfig, build_loader
from qwen3vl.data.shards import ShardWriter

WORDS = ("the a of and to in is was for on that with as by at from it this are be an or which one has "
         "image picture photo shows red green blue small large left right near water sky tree road car "
         "people city house light dark morning evening river mountain field street building window door "
         "table chair book paper model data train learn vision language token sequence pack row layer "
         "attention head expert router gradient loss step batch shard worker rank epoch sample").split()
IMAGE_SIDE = 512


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _text(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 24))
        out.append(_sentence(rng, n))
        left -= n
    return " ".join(out)


def _photo(rng: random.Random) -> bytes:
    """A 512×512 JPEG with gradients, shapes and sensor-like noise (a realistic size to decode)."""
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float32) / IMAGE_SIDE
    base = np.stack([x * rng.uniform(60, 200), y * rng.uniform(60, 200), (x + y) * rng.uniform(30, 100)], -1)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, base.shape)
    image = Image.fromarray(np.clip(base + noise + rng.uniform(0, 50), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(IMAGE_SIDE), rng.randrange(IMAGE_SIDE)
        box = (x0, y0, x0 + rng.randint(20, 200), y0 + rng.randint(20, 200))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_bench_corpus(out: str | Path, *, samples: int = 200, seed: int = 0) -> str:
    """The standard mix as one dataset (mixed order); returns its shard pattern."""
    rng = random.Random(seed)
    photos = [_photo(rng) for _ in range(min(32, samples))]  # reused: decode cost is per sample, not per file
    with ShardWriter(out, "bench", max_samples=100) as writer:
        for i in range(samples):
            kind = ("caption", "caption", "interleaved", "text")[i % 4]
            if kind == "caption":
                meta = {"kind": "caption", "images": ["0.jpg"], "text": _text(rng, rng.randint(15, 60))}
                writer.write(f"b{i:06d}", meta, {"0.jpg": rng.choice(photos)})
            elif kind == "interleaved":
                content, media = [], {}
                for j in range(3):
                    media[f"{j}.jpg"] = rng.choice(photos)
                    content += [{"text": _text(rng, rng.randint(30, 120))}, {"image": f"{j}.jpg"}]
                content.append({"text": _text(rng, rng.randint(30, 120))})
                writer.write(f"b{i:06d}", {"kind": "interleaved", "content": content}, media)
            else:
                words = int(min(6000, max(40, rng.lognormvariate(np.log(600), 0.8))))
                writer.write(f"b{i:06d}", {"kind": "text", "text": _text(rng, words)})
    return str(Path(out) / f"bench-{{000000..{len(writer.paths) - 1:06d}}}.tar")


def run_bench(*, seq_length: int = 8192, rows: int = 48, pack_buffer: int = 256, corpus: str | None = None,
              samples: int = 200, seed: int = 0) -> dict:
    torch.set_num_threads(1)  # one core: the rate below is per core
    with tempfile.TemporaryDirectory() as tmp:
        pattern = corpus or write_bench_corpus(tmp, samples=samples, seed=seed)
        cfg = LoaderConfig(datasets=[(pattern, 1.0)], shuffle_buffer=100, pack_buffer=pack_buffer)
        loader = build_loader(cfg, seq_length, pad_multiple=2, seed=seed)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        real = sum(int(next(loader).cu_seqlens[-1]) for _ in range(rows))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # Throughput counts every token encoded and handed to the packer, also those still in its buffer.
    encoded = loader.stream.tokens_encoded
    return {"seq_length": seq_length, "rows": rows, "pack_buffer": pack_buffer, "tokens_encoded": encoded,
            "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "tokens_per_s_per_core": round(encoded / cpu, 1),
            "packing_efficiency": round(real / (rows * seq_length), 5), "skipped": loader.skipped_counts()}
