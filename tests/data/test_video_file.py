"""Video file members (mp4, mkv) are decoded with PyAV and encode like the same frames stored as images.

The clip is written here with PyAV: 3 s at 10 fps, 64x64, every frame one distinct solid colour, so each
decoded frame can be told apart and the lossy codec's error stays small on flat colour."""
import io
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av", reason="PyAV is in the test extra: pip install -e .[test]")

from qwen3vl.data.encode import SampleEncoder  # noqa: E402
from qwen3vl.data.loader import LoaderConfig, build_loader  # noqa: E402
from qwen3vl.data.processing_config import ProcessingConfig  # noqa: E402
from qwen3vl.data.sample_format import BadSample, RawSample  # noqa: E402
from qwen3vl.data.shards import ShardWriter  # noqa: E402

FPS, SECONDS, SIZE = 10, 3, 64
COLOURS = [((37 * i) % 256, (90 + 53 * i) % 256, (200 - 29 * i) % 256) for i in range(FPS * SECONDS)]
CAPTION = "a square that changes colour"


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (SIZE, SIZE), c) for c in COLOURS]


def video_bytes(container: str = "mp4") -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format={"mp4": "mp4", "mkv": "matroska"}[container]) as output:
        stream = output.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.qmin = stream.codec_context.qmax = 2  # near-lossless quantiser on flat blocks
        for image in frames():
            output.mux(stream.encode(av.VideoFrame.from_image(image)))
        output.mux(stream.encode())
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def file_sample(data: bytes, name: str = "clip.mp4", key: str = "clip") -> RawSample:
    return RawSample(key, "mem", {"kind": "video", "video": {"file": name}, "text": CAPTION}, {name: data})


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(cfg=ProcessingConfig(seq_length=4096, timestamp_format="seconds"))


@pytest.mark.parametrize("container", ["mp4", "mkv"])  # mkv headers carry no frame count: it is counted
def test_video_file_encodes_like_its_frames_stored_as_images(encoder, container):
    stored = {f"f{i}.png": png(f) for i, f in enumerate(frames())}
    as_frames = RawSample("clip", "mem", {"kind": "video", "video": {"frames": list(stored), "fps": FPS},
                                          "text": CAPTION}, stored)
    (want,) = encoder.encode(as_frames)
    (got,) = encoder.encode(file_sample(video_bytes(container), f"clip.{container}"))

    # 30 frames at 10 fps -> int(3 s * 2 fps) = 6 frames, indices round(linspace(0, 29, 6)), 3 temporal patches
    assert got.grid_thw.tolist() == want.grid_thw.tolist() == [[3, 4, 4]]
    for field in ("tokens", "labels", "mm_token_type_ids", "position_ids"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    text = encoder.tokenizer.decode(got.tokens.tolist())
    # frames 0,6 | 12,17 | 23,29 at 10 fps: patch times 0.3, 1.45 (binary float: prints 1.4), 2.6
    assert "<0.3 seconds>" in text and "<1.4 seconds>" in text and "<2.6 seconds>" in text
    # mpeg4 stores yuv420p: a flat colour loses only the RGB->YUV->RGB rounding and the DC quantiser
    # step (qscale 2), a few of 255 levels; normalised values move by 2/255 per level. Frames one
    # index apart differ by >= 29 levels per channel, so this also identifies the decoded frames.
    error = (got.pixel_values - want.pixel_values).abs().max().item()
    assert error < 6 * 2 / 255, error


def test_only_the_sampled_frames_are_returned(encoder):
    from qwen3vl.data.video_decoding import decode_frames, probe_video
    data = video_bytes()
    info = probe_video(data)
    assert (info.num_frames, info.fps, info.height, info.width) == (30, 10.0, SIZE, SIZE)
    got = decode_frames(data, [0, 6, 29, 29])
    means = [np.asarray(f, dtype=float).reshape(-1, 3).mean(0) for f in got]
    for mean, index in zip(means, [0, 6, 29, 29]):
        assert np.abs(mean - COLOURS[index]).max() < 6, (index, mean)


def test_truncated_video_file_is_skipped_with_reason_and_log_line(tmp_path, caplog):
    data = video_bytes()
    with ShardWriter(tmp_path, "v", max_samples=None) as writer:
        writer.write("fine", {"kind": "text", "text": "one good document"})
        writer.write("cutclip", {"kind": "video", "video": {"file": "clip.mp4"}, "text": CAPTION},
                     {"clip.mp4": data[: len(data) // 2]})
    caplog.set_level(logging.WARNING, logger="qwen3vl.data")
    loader = build_loader(LoaderConfig(datasets=[(str(tmp_path), 1.0)], shuffle_shards=False, shuffle_buffer=1,
                                       pack_buffer=4, num_epochs=1), seq_length=512, pad_multiple=2)
    assert len(list(loader)) >= 1
    assert loader.skipped_counts() == {"corrupt_video": 1}
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped sample")]
    assert "key=cutclip " in line and "reason=corrupt_video:" in line and "clip.mp4" in line, line


def test_garbage_video_file_is_corrupt(encoder):
    with pytest.raises(BadSample) as err:
        encoder.encode(file_sample(b"not a video at all" * 50))
    assert err.value.reason == "corrupt_video"


def test_missing_pyav_gives_a_clear_reason(encoder, monkeypatch):
    data = video_bytes()
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(BadSample, match=r"pip install av") as err:
        encoder.encode(file_sample(data))
    assert err.value.reason == "no_video_decoder"
