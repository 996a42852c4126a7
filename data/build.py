"""Turns common raw formats into our shards (docs/data_format.md).

* LLaVA-style JSON: a list of ``{"id", "image": "rel/path.jpg" | [paths], "conversations": [{"from":
  "human"|"gpt"|"system", "value": "<image>\\nWhat is ..."}, ...]}``; ``<image>`` marks where each
  image goes (images without a marker go in front of the first human turn). -> ``conversation``.
* JSONL text: one ``{"text": ...}`` object per line -> ``text``.
* A folder of image + caption pairs: ``name.jpg`` with ``name.txt`` next to it -> ``caption``.

Keys are a running number (``<prefix>000000042``; the source id, if any, is kept as ``"id"``), so odd
characters in source names never break the tar key convention. Entries that cannot be converted
(missing image file, no text) are skipped and counted by reason, never silently dropped.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from qwen3vl.data.shards import ShardWriter

logger = logging.getLogger("qwen3vl.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class BuildReport:
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped), "shards": self.shards}


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _image_member(path: Path, index: int) -> tuple[str, bytes]:
    if not path.is_file():
        raise _Skip("missing_image", f"image file {path} not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise _Skip("unknown_media", f"{path} is not one of {IMAGE_EXTENSIONS}")
    return f"{index}{'.jpg' if suffix == '.jpeg' else suffix}", path.read_bytes()


def llava_entry(entry: dict, image_root: Path) -> tuple[dict, dict[str, bytes]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise _Skip("missing_field", "entry has no 'conversations' list")
    images = entry.get("image", [])
    images = [images] if isinstance(images, str) else list(images)
    media = dict(_image_member(image_root / rel, i) for i, rel in enumerate(images))
    names = list(media)
    messages, placed = [], 0
    for turn in entry["conversations"]:
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise _Skip("wrong_type", f"turn {turn!r} needs 'from' in {sorted(LLAVA_ROLES)} and a string 'value'")
        content, pieces = [], turn["value"].split("<image>")
        for i, piece in enumerate(pieces):
            if i > 0:
                if placed >= len(names):
                    raise _Skip("unknown_media", "more <image> markers than images")
                content.append({"image": names[placed]})
                placed += 1
                piece = piece.lstrip("\n")  # the newline LLaVA puts after its marker
            if i < len(pieces) - 1:
                piece = piece.rstrip("\n")
            if piece:
                content.append({"text": piece})
        messages.append({"role": role, "content": content})
    unplaced = [{"image": n} for n in names[placed:]]
    if unplaced:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise _Skip("missing_field", "images but no human turn to put them in")
        first_user["content"] = unplaced + first_user["content"]
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise _Skip("empty_text", "no non-empty gpt/assistant turn")
    meta = {"kind": "conversation", "messages": messages}
    if "id" in entry:
        meta["id"] = str(entry["id"])
    return meta, media


def llava_samples(json_path: Path, image_root: Path) -> Iterator[tuple[dict, dict] | _Skip]:
    entries = json.loads(Path(json_path).read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: expected a JSON list of LLaVA entries")
    for entry in entries:
        try:
            yield llava_entry(entry, image_root)
        except _Skip as skip:
            yield skip


def jsonl_samples(path: Path, text_field: str = "text") -> Iterator[tuple[dict, dict] | _Skip]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _Skip("bad_json", f"line {number}: {exc}")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                yield _Skip("empty_text", f"line {number}: no non-empty string field {text_field!r}")
                continue
            meta = {"kind": "text", "text": text}
            if "id" in obj:
                meta["id"] = str(obj["id"])
            yield meta, {}


def image_folder_samples(folder: Path) -> Iterator[tuple[dict, dict] | _Skip]:
    for image in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file() or not caption_file.read_text(encoding="utf-8").strip():
            yield _Skip("empty_text", f"{image} has no non-empty {caption_file.name}")
            continue
        name, data = _image_member(image, 0)
        yield {"kind": "caption", "images": [name], "text": caption_file.read_text(encoding="utf-8").strip(),
               "id": str(image.relative_to(folder))}, {name: data}


def write_samples(samples: Iterable[tuple[dict, dict] | _Skip], out: str | Path, *, prefix: str = "shard",
                  max_samples: int | None = 1000, max_bytes: int | None = None) -> BuildReport:
    report = BuildReport()
    with ShardWriter(out, prefix, max_samples=max_samples, max_bytes=max_bytes) as writer:
        for index, item in enumerate(samples):
            if isinstance(item, _Skip):
                report.skipped[item.reason] += 1
                logger.warning("build: skipped entry %d: %s: %s", index, item.reason, item)
                continue
            meta, media = item
            writer.write(f"{prefix}{index:09d}", meta, media)
            report.samples += 1
    report.shards = [str(p) for p in writer.paths]
    return report
