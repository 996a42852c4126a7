"""Imports sit at the top of their module; one inside a function says why it must be lazy.

A function-level import in the package (tests/ and benchmarks/ aside) carries a ``# lazy: <reason>``
comment on its line (the first line of a multi-line import): an optional dependency (transformers,
transformer-engine, matplotlib, PyAV), a light entry point that must not load torch or megatron (the
launcher, ``qwen3vl-data``, ``qwen3vl-plan``, the config checks), an import cycle. Read from the source with
``ast``, nothing imported. The light entry points are then checked in a fresh interpreter.

``PENDING`` lists files whose function-level imports are not annotated yet, each with its owner; it may
only shrink: an entry with nothing left to annotate fails the test until it is deleted here.
"""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import qwen3vl

REPO = pathlib.Path(qwen3vl.__file__).resolve().parent
EXCLUDED = ("tests", "benchmarks", "docs")
MARK = "# lazy:"
# File (relative to the package root) -> why it is not annotated yet.
PENDING: dict[str, str] = {}


def package_files() -> list[pathlib.Path]:
    """The package's modules: every .py under the root except tests/, benchmarks/, docs/ and hidden folders."""
    found = []
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if parts[0] not in EXCLUDED and not any(p.startswith(".") or p.endswith(".egg-info") for p in parts):
            found.append(path)
    return sorted(found)


# An import statement that can be inside a function (indented, or after `def f():`): only files with one are
# parsed, which keeps the test fast.
INNER_IMPORT = re.compile(r"^[ \t]+(import|from)[ \t]|:[ \t]*(import|from)[ \t]", re.MULTILINE)


def unmarked_lazy_imports(path: pathlib.Path) -> list[int]:
    """First lines of the imports inside functions or methods of ``path`` without a ``# lazy: <reason>``."""
    source = path.read_text()
    if not INNER_IMPORT.search(source):
        return []
    lines = source.splitlines()
    found = set()
    for fn in ast.walk(ast.parse(source, str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    # An import statement holds no string literal: its line's comment starts at the first '#'.
                    _, hash_, comment = lines[node.lineno - 1].partition("#")
                    _, mark, reason = (hash_ + comment).partition(MARK)
                    if not (mark and reason.strip()):
                        found.add(node.lineno)
    return sorted(found)


def test_function_level_imports_say_why_they_are_lazy():
    files = package_files()
    assert len(files) > 50, f"found only {len(files)} package files under {REPO}"
    offenders, pending_left = [], set()
    for path in files:
        rel = str(path.relative_to(REPO))
        found = unmarked_lazy_imports(path)
        if rel in PENDING:
            pending_left.update([rel] if found else [])
            continue
        offenders += [f"{rel}:{line}" for line in found]
    assert not offenders, (
        "imports inside functions without a '# lazy: <reason>' comment on their (first) line; move each to the "
        "module's top-level imports, or say why it must stay lazy (an optional dependency, a light entry point, "
        "an import cycle):\n  " + "\n  ".join(offenders))
    stale = sorted(set(PENDING) - pending_left)
    assert not stale, f"PENDING lists files with nothing left to annotate (or gone): {stale}; delete them there"


def test_the_check_sees_an_unmarked_import(tmp_path):
    """The checker itself: a bare function-level import is found, a marked (multi-line) one is not."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\n\ndef f():\n    import json\n    from typing import (  # lazy: a reason\n"
                      "        Any)\n    import re  # noqa: F401  # lazy: another\n    import csv  # lazy:\n\n\n"
                      "class C:\n    def g(self):\n        from io import StringIO\n\n\ndef h(): import glob\n")
    assert unmarked_lazy_imports(module) == [5, 9, 14, 17]


# Modules that a process which must stay free of torch and megatron imports: the launcher's parent
# (qwen3vl-launch composes and validates the config there, before any rank starts), the data CLI before it
# runs a command, the demo's parent process (it runs the stages as subprocesses) and the metrics/plot helpers it
# reads a run with.
LIGHT_MODULES = ["qwen3vl.launch.launcher", "qwen3vl.data.cli", "qwen3vl.train.metrics", "qwen3vl.launch.demo"]


@pytest.mark.parametrize("name", LIGHT_MODULES)
def test_light_entry_points_import_neither_torch_nor_megatron(name):
    code = f"import sys, {name}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'megatron'}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", (
        f"importing {name} now loads {out.stdout.strip()}: one of its imports (or theirs) reaches torch or "
        f"megatron; make that import lazy, with a '# lazy:' comment")
