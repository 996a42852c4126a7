"""Shared by the launcher and Slurm tests: the uninterrupted tiny S0 run (qwen3vl_testing.reference_run)."""
from __future__ import annotations

import pytest

from qwen3vl_testing.reference_run import straight_trace


@pytest.fixture(scope="session")
def s0_reference(tmp_path_factory, demo_dir) -> dict[int, tuple]:
    return straight_trace(tmp_path_factory.mktemp("s0_straight"), demo_dir)
