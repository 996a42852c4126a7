"""The demo corpus: deterministic, learnable (the caption is a function of the picture), with a real
held-out split of (colour, shape, position) combinations."""
import hashlib
import io
import json

from PIL import Image

from qwen3vl.data.demo import COLOURS, POSITIONS, SHAPES, IMAGE_SIZE, Combo, parse_caption, split_combos, write_demo
from qwen3vl.data.shards import expand_shards, read_shard


def records(pattern):
    return [r for url in expand_shards(pattern) for r in read_shard(url)]


def test_demo_is_deterministic_and_seeded(tmp_path):
    small = dict(captions=12, videos=2, interleaved=3, texts=4, samples_per_shard=5)
    digests = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_demo(tmp_path / name, seed=seed, **small)
        files = sorted(p for p in (tmp_path / name).rglob("*.tar"))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in files])
    assert digests[0] == digests[1] and digests[0] != digests[2]


def test_captions_state_what_the_picture_shows(tmp_path):
    manifest = write_demo(tmp_path, seed=3, captions=30, videos=2, interleaved=2, texts=2)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["subsets"]["caption"]["pattern"] == "caption/caption-{000000..000000}.tar"  # relative
    assert manifest["subsets"]["caption"]["pattern"] == str(tmp_path.resolve() / saved["subsets"]["caption"]["pattern"])
    for record in records(manifest["subsets"]["caption"]["pattern"]):
        words = record.meta["text"].rstrip(".").split()
        colour, shape = words[1], words[2]
        position = " ".join(words[5:])
        image = Image.open(io.BytesIO(record.media["0.jpg"])).convert("RGB")
        fx, fy = POSITIONS[position]
        pixel = image.getpixel((int(fx * IMAGE_SIZE), int(fy * IMAGE_SIZE) + 8))  # inside every shape kind
        assert sum(abs(a - b) for a, b in zip(pixel, COLOURS[colour])) < 60, (record.key, pixel, colour)
        assert shape in SHAPES


def test_heldout_combinations_never_appear_in_training(tmp_path):
    manifest = write_demo(tmp_path, seed=0, captions=90, videos=4, interleaved=10, texts=4)
    _, heldout = split_combos(0)
    assert manifest["heldout"] == [c.caption() for c in heldout] and len(heldout) >= 5
    training_text = " ".join(
        json.dumps(r.meta) for name in ("caption", "interleaved", "video")
        for r in records(manifest["subsets"][name]["pattern"]))
    for combo in heldout:
        assert f"{combo.colour} {combo.shape} in the {combo.position}" not in training_text
    for word in [*COLOURS, *SHAPES, *POSITIONS]:  # every attribute is still taught
        assert word in training_text
    assert len(records(manifest["subsets"]["heldout"]["pattern"])) == len(heldout)


def test_videos_show_the_shape_moving(tmp_path):
    manifest = write_demo(tmp_path, seed=5, captions=1, videos=3, interleaved=1, texts=1)
    for record in records(manifest["subsets"]["video"]["pattern"]):
        frames = [Image.open(io.BytesIO(record.media[name])).convert("L") for name in record.meta["video"]["frames"]]
        assert len(frames) == 8 and record.meta["video"]["fps"] == 2.0
        assert frames[0].tobytes() != frames[-1].tobytes()
        assert "seconds" in record.meta["text"] and "moves from the" in record.meta["text"]


def test_a_caption_is_read_for_its_first_colour_shape_and_position():
    assert parse_caption("An orange circle in the top left.") == Combo("orange", "circle", "top left")
    assert parse_caption("A blue square in the center. A red triangle in the top right.") == \
        Combo("blue", "square", "center")
    assert parse_caption("A in the bottom left. in the bottom left.") is None  # no colour, no shape
    assert all(parse_caption(c.caption()) == c for c in split_combos(0)[1])
