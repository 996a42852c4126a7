"""Shared by every test folder: the demo corpus (built once per session) and the CPU/GPU split.

The suite runs on the CPU, also on a machine with a GPU; GPU tests run only when asked for (``--gpu``).

Without ``--gpu`` CUDA is hidden from this process and everything it starts (gloo workers, the launcher's
ranks) before any test module imports torch: megatron would otherwise allocate on the GPU while the CPU
backend stays off, and the gloo tests would fail with mixed devices. Tests marked ``gpu`` are skipped.

With ``--gpu`` only the ``gpu`` tests run, with the GPU visible (the CPU-only tests would not be CPU-only
any more):

    python -m pytest --gpu tests/model
"""
from __future__ import annotations

import os

import pytest

GPU_MARK = "gpu"


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="run only the tests marked 'gpu', with CUDA visible (needs a GPU)")


def pytest_configure(config):
    if config.getoption("--gpu"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu runs the GPU tests but torch sees no GPU: drop --gpu on a CPU machine")
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA in this process or a child


def pytest_collection_modifyitems(config, items):
    # The marker, not item.keywords: keywords also hold the names of parent folders (a checkout named 'gpu').
    is_gpu = {item: item.get_closest_marker(GPU_MARK) is not None for item in items}
    if config.getoption("--gpu"):
        config.hook.pytest_deselected(items=[item for item in items if not is_gpu[item]])
        items[:] = [item for item in items if is_gpu[item]]
        return
    skip = pytest.mark.skip(reason="GPU test: run with `python -m pytest --gpu` on a machine with a GPU")
    for item in items:
        if is_gpu[item]:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    from qwen3vl.data.demo import write_demo

    path = tmp_path_factory.mktemp("demo_corpus")
    write_demo(path)
    return str(path)
