"""Shared fixtures of the training tests: the demo corpus, built once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    from qwen3vl.data.demo import write_demo

    path = tmp_path_factory.mktemp("demo_corpus")
    write_demo(path)
    return str(path)
