"""Every field of the training config is read by something besides its own validation.

A knob that is accepted, validated and then read by nothing (``train.eval_interval`` was one) tells a user
that something happens when nothing does. For every leaf field of ``Qwen3VLTrainConfig`` the package's own
source (tests, docs and recipes aside; ``config_checks.py``, the validation, aside too) must read it: an
attribute access ``.name`` or the name as a string (``getattr``, ``asdict`` keys, dict lookups of
``to_dict``-ed sections). Name-based, so a field that shares its name with another one may pass unread;
a field no code names at all always fails.
"""
from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

import qwen3vl
from qwen3vl.train import config as config_module
from qwen3vl.train.config import Qwen3VLTrainConfig

PACKAGE = Path(qwen3vl.__file__).resolve().parent
VALIDATION = PACKAGE / "train" / "config_checks.py"
# Sections whose fields are read all together, by name (the key list names them where they are read).
READ_AS_A_WHOLE = {
    "optim.lr": "build_optimizer takes asdict(optim.lr): one learning rate per part, keyed by the field names",
    "data.processing": "a dict of ProcessingConfig fields, not fields of the schema",
    "model.overrides": "a dict of architecture fields, not fields of the schema",
}


def leaf_fields(cls, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, field name) of every leaf field, nested dataclasses and lists of them included."""
    hints = get_type_hints(cls, vars(config_module))
    found = []
    for f in fields(cls):
        path, hint = f"{prefix}{f.name}", hints[f.name]
        inner = [a for a in getattr(hint, "__args__", ()) if is_dataclass(a)]
        nested = hint if is_dataclass(hint) else inner[0] if inner else None
        if nested is not None and path not in READ_AS_A_WHOLE:
            found += leaf_fields(nested, f"{path}.")
        else:
            found.append((path, f.name))
    return found


def package_source() -> str:
    files = [p for p in PACKAGE.rglob("*.py") if "tests" not in p.relative_to(PACKAGE).parts and p != VALIDATION]
    return "\n".join(p.read_text() for p in files)


def test_every_config_field_is_read_outside_its_validation():
    source = package_source()
    unread = [path for path, name in leaf_fields(Qwen3VLTrainConfig)
              if not re.search(rf"\.{name}\b|[\"']{name}[\"']", source)]
    assert not unread, (f"config fields read by nothing but their validation: {unread}. Make the code honour "
                        "them, or remove them from qwen3vl/train/config.py (and the recipes and docs)")


def test_the_check_finds_an_unread_field():
    # The walk reaches nested sections and lists of dataclasses (eval.datasets[].shards), and the search
    # fails for a name nothing reads.
    paths = dict(leaf_fields(Qwen3VLTrainConfig))
    assert {"eval.interval", "eval.datasets.shards", "train.recompute.vision", "data.datasets.weight"} <= set(paths)
    assert not re.search(r"\.no_such_knob_anywhere\b", package_source())
