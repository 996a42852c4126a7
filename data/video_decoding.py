"""Video file members (mp4, webm, mkv...) decoded with PyAV, an optional dependency (``pip install av``).

PyAV is imported only when a sample with a video file is met, so text/image training never needs it.
``probe_video`` reads the stream's rate, frame count and size without decoding pixels (the encoder
sizes a sample before loading it); ``decode_frames`` decodes up to the last wanted frame and converts
only the wanted ones to RGB. A frame's time is its index / fps, as for frames stored with ``fps``, so
a file and its frames stored as images encode identically. Errors become ``BadSample``:
``no_video_decoder`` without PyAV, ``corrupt_video`` for bytes that do not decode.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from PIL import Image

from qwen3vl.data.sample_format import BadSample


@dataclass(frozen=True)
class VideoStreamInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def import_av(name: str = "video") -> ModuleType:
    """The ``av`` module, or ``BadSample("no_video_decoder")`` saying how to install it."""
    try:
        import av  # lazy: PyAV is optional (the video extra)
    except ImportError as e:
        raise BadSample("no_video_decoder", f"{name}: decoding video files needs PyAV ({e}); run `pip install av` "
                        "(or `pip install qwen3vl[video]`), or store the clip as frames") from None
    return av


@contextmanager
def _video_errors(name: str):
    """Maps whatever FFmpeg/PyAV raise on broken bytes to ``corrupt_video``."""
    try:
        yield
    except BadSample:
        raise
    except Exception as e:  # av.error.*, EOFError, ValueError...: all mean the bytes are unusable
        raise BadSample("corrupt_video", f"{name}: {type(e).__name__}: {e}") from None


def _open(data: bytes, name: str):
    av = import_av(name)
    container = av.open(io.BytesIO(data), mode="r")
    if not container.streams.video:
        container.close()
        raise BadSample("corrupt_video", f"{name}: the file has no video stream")
    return container, container.streams.video[0]


def probe_video(data: bytes, name: str = "video") -> VideoStreamInfo:
    """Rate, frame count and frame size of the first video stream, without decoding pixels."""
    with _video_errors(name):
        container, stream = _open(data, name)
        with container:
            rate = stream.average_rate or stream.guessed_rate
            num_frames = stream.frames
            if not num_frames:  # webm/mkv headers carry no count: count packets (no decoding)
                num_frames = sum(1 for p in container.demux(stream) if p.size)
            height, width = stream.codec_context.height, stream.codec_context.width
    if not rate or rate <= 0 or num_frames <= 0:
        raise BadSample("corrupt_video", f"{name}: no frame rate or no frames (rate {rate}, {num_frames} frames)")
    if height <= 0 or width <= 0:
        raise BadSample("zero_size_image", f"{name}: video frames of size {width}x{height}")
    return VideoStreamInfo(num_frames, float(rate), height, width)


def decode_frames(data: bytes, indices: list[int], name: str = "video") -> list[Image.Image]:
    """RGB frames at ``indices`` (increasing, repeats allowed) of the first video stream. Decoding stops
    after the last wanted frame; a stream that ends before it -> ``corrupt_video``."""
    wanted = set(indices)
    last = max(indices)
    found: dict[int, Image.Image] = {}
    with _video_errors(name):
        container, stream = _open(data, name)
        with container:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    found[index] = frame.to_image().convert("RGB")
                if index >= last:
                    break
    if len(found) != len(wanted):
        raise BadSample("corrupt_video", f"{name}: the stream ends before frame {last} "
                        f"(decoded {len(found)} of {len(wanted)} wanted frames)")
    return [found[i] for i in indices]
