"""Paths in a saved run config: relative to the run directory, so a copied or moved run stays itself.

The config saved in ``<run_dir>/config.yaml`` and in each checkpoint writes the paths that lie inside
the run directory relative to it (``run_dir: .``) under a first-line marker; paths outside it (the
data, a previous stage) stay absolute, since they do not move with it. Loading such a file as a recipe
(``--recipe <run_dir>/config.yaml``) resolves its relative paths against the run directory the file
is in now, not against the working directory; a path given again on the command line wins as usual.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Optional

MARKER = "# The run's resolved config. Paths inside the run directory are relative to it (run_dir: .)."
# (section or None, field) of every path field; data.datasets[].shards is handled on its own.
_FIELDS = ((None, "run_dir"), (None, "init_from"), ("data", "demo_dir"), ("data", "root"), ("data", "tokenizer"))


def _map_paths(cfg: Any, fn, skip: Iterable[str] = ()) -> Any:
    """A copy of ``cfg`` with ``fn`` applied to each path field (and each part of local dataset shards)."""
    cfg, skip = copy.deepcopy(cfg), set(skip)
    for section, name in _FIELDS:
        key = f"{section}.{name}" if section else name
        owner = getattr(cfg, section) if section else cfg
        if key not in skip and getattr(owner, name):
            setattr(owner, name, fn(getattr(owner, name)))
    if "data.datasets" not in skip:
        for d in cfg.data.datasets:
            if d.shards != "demo":
                d.shards = "::".join(p if ":" in p.split("/")[0] else fn(p) for p in d.shards.split("::"))
    return cfg


def relative_to_run_dir(cfg: Any) -> Any:
    """``cfg`` with the paths inside ``cfg.run_dir`` made relative to it."""
    base = Path(cfg.run_dir).resolve()

    def rel(path: str) -> str:
        if not os.path.isabs(path) or not Path(path).resolve().is_relative_to(base):
            return path
        return os.path.relpath(Path(path).resolve(), base)

    return _map_paths(cfg, rel)


def saved_run_dir(recipe: str) -> Optional[Path]:
    """The run directory a recipe file was saved in (``<run_dir>/config.yaml`` or a checkpoint's), or None."""
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return None
    with open(path) as f:
        if f.readline().strip() != MARKER:
            return None
    folder = path.resolve().parent
    return folder.parent.parent if folder.name.startswith("iter_") else folder  # <run_dir>/checkpoints/iter_*


def rebase(cfg: Any, base: Path, overridden: Iterable[str]) -> Any:
    """``cfg`` with the relative paths of a saved config resolved against ``base`` (not the working
    directory), except the fields in ``overridden`` (given on the command line)."""
    return _map_paths(cfg, lambda p: p if os.path.isabs(p) else os.path.normpath(base / p), overridden)
