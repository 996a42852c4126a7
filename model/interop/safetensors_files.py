"""safetensors files read and written one tensor at a time, so a conversion never holds a whole file.

Reading goes through safetensors' ``safe_open``, one open per tensor: a file kept open keeps every page
read so far mapped into the process, so the resident memory would grow to the file's size.

Writing: safetensors has no incremental writer, so this module writes the (small, documented) format
itself: an 8-byte little-endian header length, the JSON header (each tensor's dtype, shape and byte range,
padded with spaces to a multiple of 8 as the reference writer does), then the tensors' bytes in header
order. The header needs only names, dtypes and shapes, all known before any data, so a file is written
tensor by tensor. Each file is written under a temporary name and renamed when complete, so a crash never
leaves a truncated file that looks whole. Files are read back by safetensors itself in the tests.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A weights directory that is incomplete or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    """What the header says about one tensor (``file`` is relative to the directory)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def stored_dtype(specs: Iterable[TensorSpec]) -> torch.dtype:
    """The dtype most of the bytes are stored in (what a conversion writes by default)."""
    counts: dict[torch.dtype, int] = {}
    for spec in specs:
        counts[spec.dtype] = counts.get(spec.dtype, 0) + spec.nbytes
    return max(counts, key=counts.get)


def _file_specs(path: Path) -> dict[str, TensorSpec]:
    with safe_open(str(path), framework="pt") as f:
        specs = {}
        for name in f.keys():
            view = f.get_slice(name)
            specs[name] = TensorSpec(name, tuple(view.get_shape()), _DTYPES[view.get_dtype()], path.name)
    return specs


def read_index(directory: str | os.PathLike) -> dict[str, TensorSpec]:
    """Every tensor of a single-file or sharded safetensors directory, from the headers only."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        specs: dict[str, TensorSpec] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise SafetensorsError(f"{directory / shard} is listed in {INDEX_FILE} but does not exist; the "
                                       "checkpoint is incomplete")
            found = _file_specs(directory / shard)
            listed = {name for name, file in weight_map.items() if file == shard}
            if set(found) != listed:
                raise SafetensorsError(f"{directory / shard} holds {_listing(sorted(set(found) ^ listed))} "
                                       f"differently from {INDEX_FILE}; the checkpoint is incomplete or corrupt")
            specs.update(found)
        return specs
    if (directory / SINGLE_FILE).is_file():
        return _file_specs(directory / SINGLE_FILE)
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors "
                            "weights are supported")


def read_tensor(directory: str | os.PathLike, spec: TensorSpec) -> torch.Tensor:
    """One tensor, read on its own (see the module docstring for why the file is reopened)."""
    with safe_open(str(Path(directory) / spec.file), framework="pt") as f:
        return f.get_tensor(spec.name)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Writing


def write_file(path: str | os.PathLike, specs: Sequence[TensorSpec], tensors: Iterable[torch.Tensor]) -> None:
    """Write ``tensors`` (one per spec, same order, produced lazily by the caller) as one safetensors file."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        count = 0
        for spec, tensor in zip(specs, tensors):
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(f"{spec.name}: produced {tensor.dtype} {list(tensor.shape)} but the header says "
                                 f"{spec.dtype} {list(spec.shape)}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            count += 1
        if count != len(specs):
            raise ValueError(f"{path}: {len(specs)} tensors planned but {count} produced")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def plan_shards(groups: Sequence[Sequence[TensorSpec]], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut the tensors into files below ``max_shard_bytes`` (a single larger group gets a file of its own),
    keeping each group in one file so that it is produced once."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(spec.nbytes for spec in group)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = [SINGLE_FILE]
    return [[TensorSpec(s.name, s.shape, s.dtype, file) for s in shard] for file, shard in zip(names, shards)]


def write_index(directory: str | os.PathLike, shards: Sequence[Sequence[TensorSpec]]) -> None:
    """The index of a sharded directory; removes the file of the other kind, which loaders would prefer."""
    directory = Path(directory)
    if len(shards) == 1:
        (directory / INDEX_FILE).unlink(missing_ok=True)
        return
    weight_map = {spec.name: spec.file for shard in shards for spec in shard}
    total = sum(spec.nbytes for shard in shards for spec in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / SINGLE_FILE).unlink(missing_ok=True)
