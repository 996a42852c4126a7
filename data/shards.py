"""Webdataset tar shards: writing them with rollover, listing them, and reading them back as samples.

One sample is a group of consecutive tar members sharing a key (the member name up to its first dot):
``<key>.json`` (the sample's kind, texts and media order, see docs/data_format.md) plus its media
members ``<key>.<suffix>`` (``0.jpg``, ``1.png``, ``0.mp4``...). The reader hands each group over as a
``RawSample`` with the JSON already parsed and the media left as undecoded bytes; decoding belongs to
the encoder, so a sample that is skipped costs no decode.

Shard addresses are anything webdataset's ``gopen`` opens: local paths, ``file:``, ``pipe:CMD``
(e.g. ``pipe:curl -s https://host/shard-000.tar`` or ``pipe:aws s3 cp s3://b/s.tar -``), http(s).
Patterns use brace expansion (``data/shard-{000000..000099}.tar``) and ``::`` to join lists; a local
directory stands for the ``*.tar`` files inside it.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from qwen3vl.data.sample_format import RawSample

META_SUFFIX = "json"
# Reasons of tar-level failures (``SkippedRecord.reason``); sample-level ones are sample_format.REASONS.
SHARD_REASONS = ("missing_json", "bad_json", "truncated_tar", "unreadable_shard", "missing_shard")


@dataclass(frozen=True)
class SkippedRecord:
    """A tar-level failure: what the reader could not turn into a ``RawSample`` (the run goes on)."""

    shard: str
    key: str
    reason: str
    message: str


# --- addresses -------------------------------------------------------------------------------------
def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard addresses of one dataset, in a fixed order (the order the seeded shuffle starts from)."""
    pattern_list = [patterns] if isinstance(patterns, str) else list(patterns)
    urls: list[str] = []
    for pattern in pattern_list:
        for url in expand_urls(pattern):
            if is_local(url) and Path(_local_path(url)).is_dir():
                urls.extend(str(p) for p in sorted(Path(_local_path(url)).glob("*.tar")))
            else:
                urls.append(url)
    if not urls:
        raise FileNotFoundError(f"no shards match {patterns!r}: give a directory of .tar files, a brace "
                                f"pattern such as 'dir/shard-{{000000..000009}}.tar', or pipe:/http URLs")
    return urls


def absolute_pattern(patterns: str) -> str:
    """``patterns`` with each local part made absolute (what a run reports it reads)."""
    parts = [p if not is_local(p) or os.path.isabs(_local_path(p)) else os.path.abspath(_local_path(p))
             for p in patterns.split("::")]
    return "::".join(parts)


def check_shards_exist(urls: Sequence[str]) -> None:
    """A missing local shard is an error at start (a typo must not silently train on less data)."""
    missing = [u for u in urls if is_local(u) and not Path(_local_path(u)).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard {missing[0]} does not exist{more}; fix the dataset path or pattern")


# --- reading ---------------------------------------------------------------------------------------
def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.0.jpg`` -> (``dir/abc``, ``0.jpg``): webdataset's key convention."""
    directory, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix if dot else ""


def _group_to_record(shard: str, key: str, members: dict[str, bytes]) -> RawSample | SkippedRecord:
    if META_SUFFIX not in members:
        return SkippedRecord(shard, key, "missing_json", f"no {key}.{META_SUFFIX} member in the shard")
    try:
        meta = json.loads(members.pop(META_SUFFIX).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return SkippedRecord(shard, key, "bad_json", f"{key}.{META_SUFFIX} is not valid JSON: {exc}")
    if not isinstance(meta, dict):
        return SkippedRecord(shard, key, "bad_json", f"{key}.{META_SUFFIX} holds a {type(meta).__name__}, "
                                                     "expected an object")
    return RawSample(key=key, shard=shard, meta=meta, media=members)


def read_shard(url: str) -> Iterator[RawSample | SkippedRecord]:
    """Every sample group of one shard in tar order, bad ones as ``SkippedRecord``.

    A truncated or corrupt tar ends the shard with one ``truncated_tar`` record (the group being read
    is lost, the samples before it were already handed out); a local shard that no longer exists (it
    was checked at start) gives one ``missing_shard`` record; one that cannot be opened otherwise, or
    whose ``pipe:`` command fails, one ``unreadable_shard`` record.
    """
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError as exc:
        yield SkippedRecord(url, "", "missing_shard", f"the shard is gone: {exc}")
        return
    except OSError as exc:
        yield SkippedRecord(url, "", "unreadable_shard", f"cannot open: {exc}")
        return
    key, members, broken = None, {}, None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member_key, suffix = split_member_name(info.name)
                if member_key.startswith("__") or not suffix:
                    continue  # webdataset metadata members (__index__ etc.)
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut short")
                if member_key != key:
                    if key is not None:
                        yield _group_to_record(url, key, members)
                    key, members = member_key, {}
                members[suffix] = data
                tar.members = []  # streaming: do not keep every TarInfo of a large shard
    except OSError as exc:  # the file or the pipe: command failed (tarfile's own errors are not OSErrors)
        broken = SkippedRecord(url, key or "", "unreadable_shard", f"reading failed {_where(key)}: {exc}")
    except (tarfile.TarError, EOFError, ValueError) as exc:
        broken = SkippedRecord(url, key or "", "truncated_tar", f"tar stream broken {_where(key)}: {exc}")
    finally:
        closed_badly = _close(stream)
    if closed_badly is not None:  # the pipe: command failed: a broken tar stream is its consequence
        broken = SkippedRecord(url, key or "", "unreadable_shard", closed_badly)
    if broken is not None:
        yield broken
    elif key is not None:
        yield _group_to_record(url, key, members)


def _where(key: str | None) -> str:
    return f"after key {key!r}" if key is not None else "before the first sample (not a tar file?)"


def _close(stream) -> str | None:
    """Closes a shard stream; returns the error a failed ``pipe:`` command reports on close, if any."""
    try:
        stream.close()
    except OSError as exc:
        return f"reading failed: {exc}"
    return None


# --- writing ---------------------------------------------------------------------------------------
class ShardWriter:
    """Writes samples into ``<out_dir>/<prefix>-000000.tar``, ``-000001.tar``... with rollover.

    A new shard starts before a sample that would exceed ``max_samples`` samples or ``max_bytes``
    bytes (a single larger sample still gets a shard of its own). Members carry mtime 0 and no owner,
    so the same input gives byte-identical shards.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", *, max_samples: int | None = 1000,
                 max_bytes: int | None = None):
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.paths: list[Path] = []
        self.total_samples = 0
        self._tar: tarfile.TarFile | None = None
        self._samples = self._bytes = 0

    def _open_next(self) -> None:
        self._close_current()
        path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self._samples = self._bytes = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def write(self, key: str, meta: dict, media: dict[str, bytes] | None = None) -> None:
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} contains a dot; the key ends at the first dot of a member name")
        members = [(META_SUFFIX, json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
        members += list((media or {}).items())
        size = sum(512 + (len(data) + 511) // 512 * 512 for _, data in members)  # tar header + padded data
        full = self._tar is None or (self.max_samples is not None and self._samples >= self.max_samples) or (
            self.max_bytes is not None and self._samples > 0 and self._bytes + size > self.max_bytes)
        if full:
            self._open_next()
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._samples += 1
        self._bytes += size
        self.total_samples += 1

    def close(self) -> list[Path]:
        self._close_current()
        return list(self.paths)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
