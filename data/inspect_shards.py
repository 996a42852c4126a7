"""``qwen3vl-data inspect``: what a set of shards holds, as the loader will see it.

Every sample is read and encoded exactly as in training, so the report counts usable samples by
kind, histograms their token lengths and image sizes, and counts skipped samples by reason (with a
few example keys), before any GPU time is spent on a broken dataset.
"""
from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Sequence

from PIL import Image

from qwen3vl.data.encode import SampleEncoder
from qwen3vl.data.packed_stream import DECODE_ERRORS
from qwen3vl.data.processing_config import ProcessingConfig
from qwen3vl.data.sample_format import BadSample, ImagePart, parse_sample
from qwen3vl.data.shards import SkippedRecord, check_shards_exist, expand_shards, read_shard
from qwen3vl.data.tokenizer import load_tokenizer

TOKEN_BINS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
IMAGE_BINS = (64, 128, 256, 512, 1024, 2048, 4096)
EXAMPLES_PER_REASON = 3


def _bin(value: int, edges: Sequence[int]) -> str:
    for edge in edges:
        if value <= edge:
            return f"<={edge}"
    return f">{edges[-1]}"


def _ordered(hist: Counter, edges: Sequence[int]) -> dict[str, int]:
    labels = [f"<={e}" for e in edges] + [f">{edges[-1]}"]
    return {label: hist[label] for label in labels if hist[label]}


def _image_names(record) -> list[str]:
    document = parse_sample(record)
    return [p.media for m in document.messages for p in m.parts if isinstance(p, ImagePart)]


def inspect_shards(patterns: Sequence[str], *, tokenizer_path: str | None = None, seq_length: int = 8192,
                   processing: ProcessingConfig | None = None, limit: int | None = None) -> dict:
    urls = [u for p in patterns for u in expand_shards(p)]
    check_shards_exist(urls)
    encoder = SampleEncoder(load_tokenizer(tokenizer_path), replace(processing or ProcessingConfig(),
                                                                    seq_length=seq_length))
    kinds, skipped, tokens, sides = Counter(), Counter(), Counter(), Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    usable = total_tokens = 0

    def skip(reason: str, shard: str, key: str) -> None:
        skipped[reason] += 1
        if len(examples[reason]) < EXAMPLES_PER_REASON:
            examples[reason].append(f"{shard}:{key}")

    def full() -> bool:
        return limit is not None and usable + sum(skipped.values()) >= limit

    for url in urls:
        if full():
            break
        for record in read_shard(url):
            if full():
                break
            if isinstance(record, SkippedRecord):
                skip(record.reason, record.shard, record.key)
                continue
            try:
                samples = encoder.encode(record)
            except BadSample as exc:
                skip(exc.reason, record.shard, record.key)
                continue
            except DECODE_ERRORS:
                skip("undecodable", record.shard, record.key)
                continue
            usable += 1
            kinds[record.meta.get("kind", "?")] += 1
            for sample in samples:
                tokens[_bin(sample.length, TOKEN_BINS)] += 1
                total_tokens += sample.length
            for name in _image_names(record):  # the header gives the size without decoding again
                sides[_bin(max(Image.open(io.BytesIO(record.media[name])).size), IMAGE_BINS)] += 1
    return {"shards": len(urls), "samples": usable, "tokens": total_tokens, "by_kind": dict(sorted(kinds.items())),
            "skipped": dict(sorted(skipped.items())), "skipped_examples": dict(examples),
            "token_length_hist": _ordered(tokens, TOKEN_BINS), "image_longest_side_hist": _ordered(sides, IMAGE_BINS)}


def format_report(report: dict) -> str:
    lines = [f"{report['shards']} shards, {report['samples']} usable samples, {report['tokens']} tokens",
             "by kind:            " + ", ".join(f"{k} {n}" for k, n in report["by_kind"].items())]
    lines.append("token lengths:      " + ", ".join(f"{k}: {n}" for k, n in report["token_length_hist"].items()))
    lines.append("image longest side: " + (", ".join(f"{k}: {n}" for k, n in
                                                    report["image_longest_side_hist"].items()) or "no images"))
    if report["skipped"]:
        lines.append("skipped:")
        for reason, n in report["skipped"].items():
            lines.append(f"  {reason}: {n} (e.g. {', '.join(report['skipped_examples'][reason])})")
    else:
        lines.append("skipped: none")
    return "\n".join(lines)
