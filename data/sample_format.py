"""The sample format of our shards: one JSON document plus named media files per sample.

A shard sample (webdataset: files sharing a key) is ``<key>.json`` plus media files ``<key>.<name>``;
the reader hands it over as ``RawSample(key, shard, meta=<parsed json>, media={name: bytes})``.
Media are referenced from the JSON by ``name`` (the file name after the key, e.g. ``"0.jpg"``).

JSON schema, by ``kind`` (every kind may also carry free ``"source"`` / ``"id"`` fields, ignored):

* ``caption``       ``{"kind": "caption", "images": ["0.jpg"], "text": "a cat on a mat"}``
                    (``"image": "0.jpg"`` is accepted for one image). Rendered images first, then the text.
* ``interleaved``   ``{"kind": "interleaved", "content": [{"text": "..."}, {"image": "0.jpg"},
                    {"video": VIDEO}, ...]}`` rendered in list order.
* ``text``          ``{"kind": "text", "text": "..."}``: a plain text document.
* ``conversation``  ``{"kind": "conversation", "messages": [{"role": "system"|"user"|"assistant",
                    "content": "..." | [content items as in interleaved]}, ...]}``, ChatML.
* ``video``         ``{"kind": "video", "video": VIDEO, "text": "..."}``: a captioned clip, video first.

``VIDEO`` is a clip stored as decoded frames: ``{"frames": ["f0.jpg", "f1.jpg", ...], "fps": 30.0}``
(frames are consecutive at ``fps``), optionally with ``"frame_indices": [...]`` (indices of the stored
frames in a source video of rate ``fps``) or instead ``"timestamps": [...]`` (seconds, increasing).
A clip may instead be a video file member, ``{"file": "clip.mp4"}`` (any container PyAV reads: mp4,
webm, mkv...); it is decoded with PyAV (``pip install av``) when the sample is encoded.

``parse_sample`` turns the JSON into a ``Document`` (a list of ``Message``s of typed parts) and raises
``BadSample`` with a stable reason code for anything malformed. Media bytes are only checked for
existence here; decoding errors (``corrupt_image``...) are raised by the image/video processing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

KINDS = ("caption", "interleaved", "text", "conversation", "video")
ROLES = ("system", "user", "assistant")

# Stable reason codes (counted by the loader, logged per shard). Keep names; add new ones at the end.
REASONS = (
    "missing_field",  # a required JSON field is absent
    "wrong_type",  # a field has the wrong JSON type or value (unknown kind, role...)
    "empty_text",  # the text that carries the loss is empty
    "unknown_media",  # the JSON names a media file the sample does not have
    "corrupt_image",  # image bytes do not decode
    "truncated",  # image bytes end early
    "zero_size_image",  # width or height is 0
    "extreme_aspect_ratio",  # long side / short side > 200 (the Qwen processors refuse these)
    "image_too_large",  # more pixels than PIL's decompression-bomb limit
    "too_long_multimodal",  # a multimodal sample longer than one packed row (never cut through an image)
    "too_many_patches",  # more ViT patches than one row may carry
    "no_loss_tokens",  # nothing to train on (e.g. a conversation without an assistant turn)
    "no_video_decoder",  # a video file member but PyAV (``pip install av``) is not installed
    "corrupt_video",  # video file bytes do not decode (truncated, garbage, no video stream)
)


class BadSample(ValueError):
    """A sample whose content cannot be trained on. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown BadSample reason {reason!r}; add it to REASONS in sample_format.py")
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (BadSample, (self.reason, self.message))


@dataclass
class RawSample:
    key: str
    shard: str
    meta: dict
    media: dict[str, bytes] = field(default_factory=dict)


# --- the parsed document ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    media: str  # name in RawSample.media


@dataclass(frozen=True)
class VideoPart:
    frames: tuple[str, ...]  # names in RawSample.media, in time order (empty for a video file)
    timestamps: tuple[float, ...]  # seconds of each stored frame in the source video
    fps: float  # rate of the stored frame sequence (frames per second of the clip as stored)
    file: str | None = None  # name in RawSample.media of a video file; frames/fps come from its stream


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass(frozen=True)
class Message:
    role: str | None  # None for non-conversation kinds
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Document:
    kind: str
    key: str
    messages: tuple[Message, ...]

    @property
    def is_multimodal(self) -> bool:
        return any(not isinstance(p, TextPart) for m in self.messages for p in m.parts)


def _fail(reason: str, raw: RawSample, what: str) -> BadSample:
    return BadSample(reason, f"sample {raw.key!r} in {raw.shard!r}: {what}")


def _require(raw: RawSample, obj: dict, name: str, types: type | tuple[type, ...], where: str = "") -> Any:
    if name not in obj:
        raise _fail("missing_field", raw, f"{where}field {name!r} is missing")
    value = obj[name]
    if not isinstance(value, types) or isinstance(value, bool):
        raise _fail("wrong_type", raw, f"{where}field {name!r} is {type(value).__name__}, expected {types}")
    return value


def _text(raw: RawSample, obj: dict, name: str = "text", where: str = "") -> TextPart:
    text = _require(raw, obj, name, str, where)
    if not text.strip():
        raise _fail("empty_text", raw, f"{where}field {name!r} is empty")
    return TextPart(text)


def _media(raw: RawSample, name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise _fail("wrong_type", raw, f"{where}media reference {name!r} is not a string")
    if name not in raw.media:
        have = ", ".join(sorted(raw.media)) or "none"
        raise _fail("unknown_media", raw, f"{where}media {name!r} is not in the sample (it has: {have})")
    return name


def _video(raw: RawSample, spec: Any, where: str) -> VideoPart:
    if not isinstance(spec, dict):
        raise _fail("wrong_type", raw, f"{where}video must be an object with 'frames' or 'file'")
    if "file" in spec:  # frame count, rate and size are only known once the file is opened (encode.py)
        return VideoPart((), (), 0.0, _media(raw, spec["file"], where + "video "))
    frames = _require(raw, spec, "frames", list, where + "video ")
    if not frames:
        raise _fail("missing_field", raw, f"{where}video has no frames")
    names = tuple(_media(raw, f, where + "video ") for f in frames)
    n = len(names)
    if "timestamps" in spec:
        ts = _require(raw, spec, "timestamps", list, where + "video ")
        if len(ts) != n or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in ts):
            raise _fail("wrong_type", raw, f"{where}video needs one finite timestamp per frame")
        if any(b <= a for a, b in zip(ts, ts[1:])):
            raise _fail("wrong_type", raw, f"{where}video timestamps must increase")
        timestamps = tuple(float(t) for t in ts)
        # Rate of the stored sequence; a single frame gets 1 fps (its duration is then 1 s).
        fps = (n - 1) / (timestamps[-1] - timestamps[0]) if n > 1 else 1.0
        return VideoPart(names, timestamps, fps)
    fps = _require(raw, spec, "fps", (int, float), where + "video ")
    if not (math.isfinite(fps) and fps > 0):
        raise _fail("wrong_type", raw, f"{where}video fps must be > 0, got {fps}")
    indices = spec.get("frame_indices", list(range(n)))
    if not isinstance(indices, list) or len(indices) != n or not all(isinstance(i, int) for i in indices):
        raise _fail("wrong_type", raw, f"{where}video frame_indices must be one int per frame")
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise _fail("wrong_type", raw, f"{where}video frame_indices must increase")
    timestamps = tuple(i / fps for i in indices)
    stored_fps = fps * (n - 1) / (indices[-1] - indices[0]) if n > 1 else float(fps)
    return VideoPart(names, timestamps, stored_fps)


def _content(raw: RawSample, content: Any, where: str) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (TextPart(content),)
    if not isinstance(content, list):
        raise _fail("wrong_type", raw, f"{where}content must be a string or a list of items")
    parts: list[Part] = []
    for i, item in enumerate(content):
        at = f"{where}content[{i}] "
        if not isinstance(item, dict) or len(set(item) & {"text", "image", "video"}) != 1:
            raise _fail("wrong_type", raw, f"{at}must be an object with exactly one of text/image/video")
        if "text" in item:
            parts.append(TextPart(_require(raw, item, "text", str, at)))
        elif "image" in item:
            parts.append(ImagePart(_media(raw, item["image"], at)))
        else:
            parts.append(_video(raw, item["video"], at))
    return tuple(parts)


def parse_sample(raw: RawSample) -> Document:
    """Validates ``raw.meta`` against the schema above and returns the parsed ``Document``."""
    meta = raw.meta
    if not isinstance(meta, dict):
        raise _fail("wrong_type", raw, "the sample JSON must be an object")
    kind = _require(raw, meta, "kind", str)
    if kind not in KINDS:
        raise _fail("wrong_type", raw, f"kind {kind!r} is not one of {KINDS}")

    if kind == "text":
        parts: tuple[Part, ...] = (_text(raw, meta),)
    elif kind == "caption":
        if "image" in meta and "images" not in meta:
            names = [meta["image"]]
        else:
            names = _require(raw, meta, "images", list)
        if not names:
            raise _fail("missing_field", raw, "caption has no images")
        parts = tuple(ImagePart(_media(raw, n, "")) for n in names) + (_text(raw, meta),)
    elif kind == "video":
        parts = (_video(raw, _require(raw, meta, "video", dict), ""), _text(raw, meta))
    elif kind == "interleaved":
        parts = _content(raw, _require(raw, meta, "content", list), "")
        if not any(isinstance(p, TextPart) and p.text.strip() for p in parts):
            raise _fail("empty_text", raw, "interleaved document has no text")
    else:
        return Document(kind, raw.key, _messages(raw, _require(raw, meta, "messages", list)))
    return Document(kind, raw.key, (Message(None, parts),))


def _messages(raw: RawSample, messages: list) -> tuple[Message, ...]:
    out = []
    for i, msg in enumerate(messages):
        at = f"messages[{i}] "
        if not isinstance(msg, dict):
            raise _fail("wrong_type", raw, f"{at}must be an object with role and content")
        role = _require(raw, msg, "role", str, at)
        if role not in ROLES:
            raise _fail("wrong_type", raw, f"{at}role {role!r} is not one of {ROLES}")
        if "content" not in msg:
            raise _fail("missing_field", raw, f"{at}field 'content' is missing")
        out.append(Message(role, _content(raw, msg["content"], at)))
    answered = [m for m in out if m.role == "assistant"
                and any(isinstance(p, TextPart) and p.text.strip() for p in m.parts)]
    if not answered:
        raise _fail("no_loss_tokens", raw, "conversation has no non-empty assistant turn")
    return tuple(out)
