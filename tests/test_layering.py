"""The subpackage import graph is layered: no cycle, and data/parallel/model never reach up into train/launch.

Read from the source with ``ast`` (imports inside functions count too: a lazy import still makes the
dependency). Today the packages stack as data <- parallel <- model <- train <- launch.

``KNOWN_VIOLATIONS`` lists the edges that still break the rule, each with its owner; it may only shrink:
an entry whose import is gone fails the test until it is deleted here, so the list ends empty.
"""
from __future__ import annotations

import ast
import pathlib

import qwen3vl

REPO = pathlib.Path(qwen3vl.__file__).resolve().parent
SUBPACKAGES = ("data", "parallel", "model", "train", "launch")
LOWER = ("data", "parallel", "model")  # may not import UPPER
UPPER = ("train", "launch")
# (importing file, imported subpackage) edges that still break the rule; empty now that training
# checkpoints carry model_config.json and model/interop reads it without qwen3vl.train.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _imported_subpackages(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "qwen3vl"
                                     else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "qwen3vl" and len(parts) > 1 and parts[1] in SUBPACKAGES:
                found.add(parts[1])
    return found


def import_edges() -> dict[tuple[str, str], set[str]]:
    """(from subpackage, to subpackage) -> the files (relative to the package root) that make the edge."""
    edges: dict[tuple[str, str], set[str]] = {}
    for sub in SUBPACKAGES:
        for path in sorted((REPO / sub).rglob("*.py")):
            for target in _imported_subpackages(path) - {sub}:
                edges.setdefault((sub, target), set()).add(str(path.relative_to(REPO)))
    return edges


def _without_known(edges):
    kept = {}
    for (src, dst), files in edges.items():
        files = {f for f in files if (f, dst) not in KNOWN_VIOLATIONS}
        if files:
            kept[(src, dst)] = files
    return kept


def _cycle(edges) -> list[str] | None:
    """One cycle of the subpackage graph (as a path that returns to its start), or None."""
    graph = {sub: sorted(dst for src, dst in edges if src == sub) for sub in SUBPACKAGES}
    done: set[str] = set()

    def visit(path: list[str]) -> list[str] | None:
        for nxt in graph[path[-1]]:
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(path + [nxt])
                if found:
                    return found
        done.add(path[-1])
        return None

    for sub in SUBPACKAGES:
        found = None if sub in done else visit([sub])
        if found:
            return found
    return None


def test_subpackage_imports_have_no_cycle():
    edges = _without_known(import_edges())
    cycle = _cycle(edges)
    assert cycle is None, (f"import cycle {' -> '.join(cycle)}: " + "; ".join(
        f"{a}->{b} via {sorted(edges[(a, b)])}" for a, b in zip(cycle, cycle[1:])))


def test_lower_packages_never_import_train_or_launch():
    edges = _without_known(import_edges())
    bad = {edge: files for edge, files in edges.items() if edge[0] in LOWER and edge[1] in UPPER}
    assert not bad, f"data/parallel/model must not import train/launch: {bad}"


def test_known_violations_only_shrink():
    edges = import_edges()
    gone = [(f, dst) for f, dst in sorted(KNOWN_VIOLATIONS)
            if f not in edges.get((f.split("/")[0], dst), set())]
    assert not gone, f"these imports are gone: delete them from KNOWN_VIOLATIONS: {gone}"
