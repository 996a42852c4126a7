"""``qwen3vl-data bench``: packed tokens per second per CPU core, and packing efficiency.

The standard mix (by sample): half captions with one 512×512 JPEG, a quarter interleaved documents
with three 512×512 JPEGs, a quarter text documents (log-normal lengths, median ~800 tokens). The
loader runs in this process with one torch thread, exactly as in training (read, decode, resize,
patchify, tokenize, MRoPE positions, pack), and the rate is every token encoded and handed to the
packer divided by the CPU time this process used: contention from other processes on a shared
machine distorts it far less than wall time, and "per core" is literal. It is the steady state of a
long run: the first row (the packer's first fill of ``pack_buffer`` samples) is drawn before the
clock starts, and the clock stops just after a round of encoding, so the window holds whole rounds
(encoding comes in rounds, rows are built between them). Efficiency is the non-pad fraction of the rows.

``by_kind``: the same measurement on a corpus of one kind each (the mix's captions, interleaved and
text documents, and videos of eight 512×512 JPEG frames at 2 fps). ``decode_floor_tokens_per_s``:
the caption corpus's tokens over the CPU time of only decoding each caption's JPEG (PIL) and
normalising it into float32 (one frame, no patch layout): what no implementation can avoid, measured
in the same run so that the ratio caption / floor holds under any load.
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

from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.loader import LoaderConfig, build_loader
from qwen3vl.data.shards import ShardWriter, expand_shards, read_shard
from qwen3vl.data.tokenizer import load_tokenizer

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


KINDS = ("caption", "interleaved", "text", "video")
MIX = ("caption", "caption", "interleaved", "text")  # the standard mix, by sample
VIDEO_FRAMES, VIDEO_FPS = 8, 2.0


def write_bench_corpus(out: str | Path, *, samples: int = 200, seed: int = 0, kind: str | None = None) -> str:
    """The standard mix as one dataset (mixed order), or ``samples`` of one ``kind``; returns its shard
    pattern."""
    rng = random.Random(seed)
    frames = VIDEO_FRAMES if kind == "video" else 1
    photos = [_photo(rng) for _ in range(min(32, samples * frames))]  # reused: decoding costs per sample
    with ShardWriter(out, "bench", max_samples=100) as writer:
        for i in range(samples):
            kind_i = kind or MIX[i % len(MIX)]
            if kind_i == "video":
                media = {f"f{j}.jpg": rng.choice(photos) for j in range(VIDEO_FRAMES)}
                meta = {"kind": "video", "video": {"frames": list(media), "fps": VIDEO_FPS},
                        "text": _text(rng, rng.randint(15, 60))}
                writer.write(f"b{i:06d}", meta, media)
            elif kind_i == "caption":
                meta = {"kind": "caption", "images": ["0.jpg"], "text": _text(rng, rng.randint(15, 60))}
                writer.write(f"b{i:06d}", meta, {"0.jpg": rng.choice(photos)})
            elif kind_i == "interleaved":
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


def _loader_rate(pattern: str, seq_length: int, rows: int, pack_buffer: int, seed: int) -> dict:
    cfg = LoaderConfig(datasets=[(pattern, 1.0)], shuffle_buffer=100, pack_buffer=pack_buffer)
    loader = build_loader(cfg, seq_length, pad_multiple=2, seed=seed)
    next(loader)  # steady state: the packer's first fill (and first buffers) happen before the clock starts
    start = loader.stream.tokens_encoded
    cpu0, wall0 = time.process_time(), time.perf_counter()
    real = drawn = 0
    while True:
        # The packer encodes in rounds (a refill of its buffer) and builds rows in between: the clock
        # starts just after a round (the first row) and stops just after one, so the window holds whole
        # rounds of encoding with the rows built from them, whatever the number of rows per round.
        before = loader.stream.tokens_encoded
        real += int(next(loader).cu_seqlens[-1])
        drawn += 1
        if drawn >= rows and loader.stream.tokens_encoded != before:
            break
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # Throughput counts every token encoded and handed to the packer, also those still in its buffer.
    encoded = loader.stream.tokens_encoded - start
    return {"tokens_encoded": encoded, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "tokens_per_s_per_core": round(encoded / cpu, 1), "packing_efficiency": round(real / (drawn * seq_length), 5),
            "skipped": loader.skipped_counts()}


def decode_floor(pattern: str, seed: int) -> float:
    """Tokens per CPU second if a caption sample cost only its JPEG decode and float32 normalisation."""
    encoder = SampleEncoder(load_tokenizer())
    tokens, cpu = 0, 0.0
    for url in expand_shards(pattern):
        for record in read_shard(url):
            tokens += sum(s.length for s in encoder.encode(record))
            start = time.process_time()
            for name in record.meta["images"]:
                image = Image.open(io.BytesIO(record.media[name]))
                image.load()
                planes = np.asarray(image, dtype=np.float32)  # the floor is ours-independent: plain numpy
                planes /= 255
                planes -= 0.5
                planes *= 2
            cpu += time.process_time() - start
    return tokens / cpu


def run_bench(*, seq_length: int = 8192, rows: int = 48, pack_buffer: int = 256, corpus: str | None = None,
              samples: int = 200, seed: int = 0, by_kind: bool = True) -> dict:
    torch.set_num_threads(1)  # one core: the rate below is per core
    with tempfile.TemporaryDirectory() as tmp:
        pattern = corpus or write_bench_corpus(Path(tmp) / "mix", samples=samples, seed=seed)
        result = {"seq_length": seq_length, "rows": rows, "pack_buffer": pack_buffer,
                  **_loader_rate(pattern, seq_length, rows, pack_buffer, seed)}
        if by_kind:
            patterns = {kind: write_bench_corpus(Path(tmp) / kind, samples=samples, seed=seed, kind=kind)
                        for kind in KINDS}
            result["by_kind"] = {kind: _loader_rate(patterns[kind], seq_length, rows, pack_buffer, seed)
                                 ["tokens_per_s_per_core"] for kind in KINDS}
            result["decode_floor_tokens_per_s"] = round(decode_floor(patterns["caption"], seed), 1)
            result["caption_fraction_of_floor"] = round(result["by_kind"]["caption"]
                                                        / result["decode_floor_tokens_per_s"], 3)
    return result
