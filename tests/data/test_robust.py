"""Bad input is skipped with one log line (shard, key, reason) and counted; the run goes on.

Every case is a real broken file inside a real shard, read through the loader the trainer uses."""
import io
import logging
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from qwen3vl.data.loader import LoaderConfig, build_loader
from qwen3vl.data.robust import TooManyBadSamples
from qwen3vl.data.shards import ShardWriter


def image_bytes(width, height, fmt="JPEG"):
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, format=fmt)
    return out.getvalue()


def zero_width_png():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 64, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


GOOD_JPEG = image_bytes(64, 64)
CAPTION = {"kind": "caption", "images": ["0.jpg"], "text": "a red square"}
BAD = {  # key: (meta, media, expected reasons)
    "corrupt": (CAPTION, {"0.jpg": b"this is no image at all, just text" * 4}, {"corrupt_image"}),
    "truncjpg": (CAPTION, {"0.jpg": GOOD_JPEG[: len(GOOD_JPEG) // 2]}, {"truncated"}),
    # PIL refuses to open an image of width 0 at all, so it is reported as undecodable
    "zerowide": (dict(CAPTION, images=["0.png"]), {"0.png": zero_width_png()}, {"zero_size_image", "corrupt_image"}),
    "emptyfile": (CAPTION, {"0.jpg": b""}, {"zero_size_image", "corrupt_image"}),
    "aspect": (dict(CAPTION, images=["0.png"]), {"0.png": image_bytes(402, 2, "PNG")}, {"extreme_aspect_ratio"}),
    "notext": ({"kind": "caption", "images": ["0.jpg"]}, {"0.jpg": GOOD_JPEG}, {"missing_field"}),
    "wrongtype": (dict(CAPTION, text=5), {"0.jpg": GOOD_JPEG}, {"wrong_type"}),
    "unknownmedia": (dict(CAPTION, images=["7.jpg"]), {"0.jpg": GOOD_JPEG}, {"unknown_media"}),
    "emptytext": ({"kind": "text", "text": "   "}, {}, {"empty_text"}),
    "badkind": ({"kind": "hologram", "text": "x"}, {}, {"wrong_type"}),
}


def config(*patterns, **kw):
    kw.setdefault("shuffle_buffer", 1)
    return LoaderConfig(datasets=[(p, 1.0) for p in patterns], shuffle_shards=False, pack_buffer=4, num_epochs=1,
                        **kw)


def test_every_kind_of_bad_input_is_skipped_logged_and_counted(tmp_path, caplog):
    good = 0
    with ShardWriter(tmp_path / "mixed", "m", max_samples=None) as writer:
        for key, (meta, media, _) in BAD.items():
            writer.write(f"good{good}", {"kind": "text", "text": f"document number {good}"})
            good += 1
            writer.write(key, meta, media)
    # a truncated tar: two good samples, then a cut inside the third
    with ShardWriter(tmp_path / "cut", "c", max_samples=None) as writer:
        for i in range(3):
            writer.write(f"cutgood{i}", CAPTION, {"0.jpg": GOOD_JPEG})
    shard = writer.paths[0]
    with tarfile.open(shard) as tar:
        cut = tar.getmember("cutgood2.0.jpg").offset_data + 100
    shard.write_bytes(shard.read_bytes()[:cut])

    caplog.set_level(logging.WARNING, logger="qwen3vl.data")
    loader = build_loader(config(str(tmp_path / "mixed"), str(tmp_path / "cut")), seq_length=512, pad_multiple=2)
    batches = list(loader)
    samples = sum(int(((b.cu_seqlens[1:] - b.cu_seqlens[:-1]) > 0).sum()) for b in batches)
    assert samples == good + 2  # every good sample made it, the ones before the tar cut included

    counts = loader.skipped_counts()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped sample")]
    assert len(lines) == len(BAD) + 1 == sum(counts.values())
    for key, (_, _, reasons) in BAD.items():
        (line,) = [x for x in lines if f" key={key} " in x]
        assert "m-000000.tar" in line and any(f"reason={r}:" in line for r in reasons), line
    (cut_line,) = [x for x in lines if "reason=truncated_tar" in x]
    assert "c-000000.tar" in cut_line and "cutgood2" in cut_line
    assert counts["truncated_tar"] == 1 and counts["wrong_type"] == 2


def test_consecutive_failures_stop_with_a_clear_message(tmp_path):
    with ShardWriter(tmp_path, "bad", max_samples=None) as writer:
        writer.write("fine", {"kind": "text", "text": "one good document"})
        for i in range(5):
            writer.write(f"broken{i}", CAPTION, {"0.jpg": b"garbage"})
    loader = build_loader(config(str(tmp_path), max_consecutive_failures=3), seq_length=256)
    with pytest.raises(TooManyBadSamples, match=r"3 consecutive samples failed .*broken2.*max_consecutive_failures"):
        list(loader)


def test_a_good_sample_resets_the_failure_run(tmp_path):
    with ShardWriter(tmp_path, "alt", max_samples=None) as writer:
        for i in range(6):
            writer.write(f"broken{i}", CAPTION, {"0.jpg": b"garbage"})
            writer.write(f"fine{i}", {"kind": "text", "text": f"good document {i}"})
    loader = build_loader(config(str(tmp_path), max_consecutive_failures=2), seq_length=256)
    assert len(list(loader)) >= 1
    assert loader.skipped_counts() == {"corrupt_image": 6}


def test_missing_shard_at_start_is_an_error(tmp_path):
    with ShardWriter(tmp_path, "have", max_samples=1) as writer:
        writer.write("a", {"kind": "text", "text": "x"})
    with pytest.raises(FileNotFoundError, match="have-000001.tar does not exist"):
        build_loader(config(str(tmp_path / "have-{000000..000001}.tar")), seq_length=256)


def test_worker_processes_count_skips_and_report_fatal_errors(tmp_path):
    with ShardWriter(tmp_path / "some", "s", max_samples=4) as writer:
        for i in range(8):
            if i in (2, 5):
                writer.write(f"broken{i}", CAPTION, {"0.jpg": b"garbage"})
            writer.write(f"fine{i}", {"kind": "text", "text": f"good document {i}"})
    loader = build_loader(config(str(tmp_path / "some")), seq_length=256, num_workers=2)
    assert len(list(loader)) >= 2
    assert loader.skipped_counts() == {"corrupt_image": 2}
    loader.close()

    with ShardWriter(tmp_path / "all_bad", "b", max_samples=None) as writer:
        for i in range(4):
            writer.write(f"broken{i}", CAPTION, {"0.jpg": b"garbage"})
    loader = build_loader(config(str(tmp_path / "all_bad"), max_consecutive_failures=2), seq_length=256,
                          num_workers=1)
    with pytest.raises(TooManyBadSamples, match="2 consecutive samples failed") as raised:
        next(loader)  # the worker's own exception, with where it came from
    assert any("in data worker 0:" in note for note in raised.value.__notes__)
