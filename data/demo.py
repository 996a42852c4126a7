"""A small, learnable demo corpus: drawn shapes whose captions state colour, shape and position.

Everything is generated from a seed with PIL, so the demo needs no download, and a small model can
learn it: the caption is a function of the picture. Subsets, one folder of shards each:

* ``caption/``     one 256×256 JPEG of a shape and "A red circle in the top left." style captions;
* ``video/``       8 frames (2 fps) of a shape moving between two positions, with a timestamped description;
* ``interleaved/`` documents alternating text and two or three shape pictures;
* ``text/``        text-only documents about the shapes (no pictures);
* ``heldout/``     captions of (colour, shape, position) combinations that no training subset shows, for
                   the demo's final captioning check (compositional generalisation, not memorisation).

``manifest.json`` lists the subsets, their shard patterns and sample counts, and the held-out
combinations with their reference captions. The patterns are relative to the manifest's folder, so a
copied or moved corpus is read where it is now (``read_manifest`` resolves them), never where it was
written.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

import torch.distributed as dist

from qwen3vl.data.loader import DatasetSpec
from qwen3vl.data.shards import ShardWriter

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
           "purple": (140, 40, 170), "orange": (250, 130, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
IMAGE_SIZE, VIDEO_SIZE, VIDEO_FRAMES, VIDEO_FPS = 256, 128, 8, 2.0
MANIFEST = "manifest.json"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Combo:
    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        return f"{article(self.colour).capitalize()} {self.colour} {self.shape} in the {self.position}."


def parse_caption(text: str) -> Combo | None:
    """The (colour, shape, position) a caption states first, or None when one of them is missing."""
    found = []
    for words in (COLOURS, SHAPES, POSITIONS):
        hits = [(text.find(w), w) for w in words if w in text]
        if not hits:
            return None
        found.append(min(hits)[1])
    return Combo(*found)


def all_combos() -> list[Combo]:
    return [Combo(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def split_combos(seed: int, heldout_fraction: float = 0.1) -> tuple[list[Combo], list[Combo]]:
    """(train, held-out) combinations; every colour, shape and position still occurs in training."""
    combos = all_combos()
    random.Random(seed).shuffle(combos)
    heldout: list[Combo] = []
    for combo in combos:
        if len(heldout) >= heldout_fraction * len(combos):
            break
        rest = [c for c in combos if c not in heldout and c != combo]
        if all(any(getattr(c, f) == getattr(combo, f) for c in rest) for f in ("colour", "shape", "position")):
            heldout.append(combo)
    return [c for c in combos if c not in heldout], heldout


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, centre: tuple[float, float], radius: float):
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)


def render(combo: Combo, size: int, rng: random.Random, centre: tuple[float, float] | None = None) -> Image.Image:
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    fx, fy = centre or POSITIONS[combo.position]
    jitter = size * 0.04
    draw_shape(ImageDraw.Draw(image), combo.shape, combo.colour,
               (fx * size + rng.uniform(-jitter, jitter), fy * size + rng.uniform(-jitter, jitter)),
               size * rng.uniform(0.12, 0.18))
    return image


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


# --- the subsets -----------------------------------------------------------------------------------
def caption_sample(combo: Combo, rng: random.Random) -> tuple[dict, dict[str, bytes]]:
    return {"kind": "caption", "images": ["0.jpg"], "text": combo.caption()}, \
        {"0.jpg": jpeg(render(combo, IMAGE_SIZE, rng))}


def video_sample(train: list[Combo], rng: random.Random) -> tuple[dict, dict[str, bytes]]:
    start = rng.choice(train)
    end_position = rng.choice([p for p in POSITIONS if p != start.position])
    (x0, y0), (x1, y1) = POSITIONS[start.position], POSITIONS[end_position]
    frames, media = [], {}
    for i in range(VIDEO_FRAMES):
        a = i / (VIDEO_FRAMES - 1)
        frame = render(start, VIDEO_SIZE, random.Random(rng.random()), (x0 + a * (x1 - x0), y0 + a * (y1 - y0)))
        media[f"f{i}.jpg"] = jpeg(frame)
        frames.append(f"f{i}.jpg")
    last = (VIDEO_FRAMES - 1) / VIDEO_FPS
    text = (f"At 0.0 seconds the {start.colour} {start.shape} is in the {start.position}. "
            f"At {last:.1f} seconds it is in the {end_position}. "
            f"The {start.colour} {start.shape} moves from the {start.position} to the {end_position}.")
    return {"kind": "video", "video": {"frames": frames, "fps": VIDEO_FPS}, "text": text}, media


def interleaved_sample(train: list[Combo], rng: random.Random) -> tuple[dict, dict[str, bytes]]:
    combos = rng.sample(train, rng.choice((2, 3)))
    content, media = [{"text": f"Here are {len(combos)} pictures of shapes."}], {}
    for i, combo in enumerate(combos):
        media[f"{i}.jpg"] = jpeg(render(combo, IMAGE_SIZE, rng))
        described = f"{article(combo.colour)} {combo.colour} {combo.shape} in the {combo.position}"
        content += [{"image": f"{i}.jpg"}, {"text": f"Picture {i + 1} shows {described}."}]
    return {"kind": "interleaved", "content": content}, media


def text_sample(rng: random.Random) -> tuple[dict, dict[str, bytes]]:
    corners = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}
    sentences = []
    for _ in range(rng.randint(3, 6)):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        position = rng.choice(list(POSITIONS))
        sentences.append(rng.choice((
            f"A {shape} has {corners[shape]}.",
            f"{article(colour).capitalize()} {colour} {shape} in the {position} is drawn on a light background.",
            f"The {position} of a picture is where a shape in the {position} appears.",
            f"{colour.capitalize()} is one of the colours: {', '.join(COLOURS)}.",
        )))
    return {"kind": "text", "text": " ".join(sentences)}, {}


def write_demo(out: str | Path, *, seed: int = 0, captions: int = 240, videos: int = 32, interleaved: int = 48,
               texts: int = 64, samples_per_shard: int = 64) -> dict:
    """Writes the corpus under ``out`` and returns the manifest (also saved as ``manifest.json``)."""
    out = Path(out)
    rng = random.Random(seed)
    train, heldout = split_combos(seed)
    subsets = {
        "caption": [caption_sample(train[i % len(train)], rng) for i in range(captions)],
        "video": [video_sample(train, rng) for _ in range(videos)],
        "interleaved": [interleaved_sample(train, rng) for _ in range(interleaved)],
        "text": [text_sample(rng) for _ in range(texts)],
        "heldout": [caption_sample(combo, rng) for combo in heldout],
    }
    manifest: dict = {"seed": seed, "subsets": {}, "heldout": [c.caption() for c in heldout]}
    for name, samples in subsets.items():
        with ShardWriter(out / name, prefix=name, max_samples=samples_per_shard) as writer:
            for i, (meta, media) in enumerate(samples):
                writer.write(f"{name}{i:06d}", meta, media)
        last = len(writer.paths) - 1
        manifest["subsets"][name] = {"pattern": f"{name}/{name}-{{000000..{last:06d}}}.tar",
                                     "samples": len(samples), "shards": len(writer.paths)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return read_manifest(out)


def read_manifest(corpus_dir: str | Path) -> dict:
    """``<corpus_dir>/manifest.json`` with every subset's pattern resolved against ``corpus_dir``."""
    corpus_dir = Path(corpus_dir).resolve()
    manifest = json.loads((corpus_dir / MANIFEST).read_text())
    for name, subset in manifest["subsets"].items():
        pattern = Path(subset["pattern"])
        if pattern.is_absolute() and pattern.parent.name == name:
            pattern = Path(name) / pattern.name  # written before patterns were relative: the layout is fixed
        subset["pattern"] = str(corpus_dir / pattern)
    return manifest


# The subset an evaluation dataset that says `shards: demo` reads: combinations no training subset shows.
HELDOUT_SUBSET = "heldout"

# What a dataset that says `shards: demo` trains on: these subsets, weighted within it (the demo is judged on
# captions); the held-out split stays out of training.
TRAINING_SUBSETS = {"caption": 4.0, "video": 1.0, "interleaved": 1.0, "text": 1.0}


def ensure_demo_corpus(demo_dir: str | Path) -> dict:
    """Rank 0 writes the demo corpus once; the others wait for it. Returns its manifest (patterns resolved
    against ``demo_dir``, so a copied corpus is read where it is)."""
    if (not dist.is_initialized() or dist.get_rank() == 0) and not (Path(demo_dir) / MANIFEST).is_file():
        write_demo(demo_dir)
    if dist.is_initialized():
        dist.barrier()
    return read_manifest(demo_dir)


def demo_datasets(demo_dir: str | Path, weight: float) -> list[DatasetSpec]:
    """The loader's datasets for one `shards: demo` entry of weight ``weight``: one per training subset."""
    manifest = ensure_demo_corpus(demo_dir)
    return [DatasetSpec(manifest["subsets"][name]["pattern"], weight * share, name)
            for name, share in TRAINING_SUBSETS.items()]


def demo_heldout(demo_dir: str | Path, name: str = HELDOUT_SUBSET) -> DatasetSpec:
    """The evaluation dataset of an `eval.datasets` entry with `shards: demo`: the corpus's held-out split."""
    manifest = ensure_demo_corpus(demo_dir)
    return DatasetSpec(manifest["subsets"][HELDOUT_SUBSET]["pattern"], 1.0, name)
