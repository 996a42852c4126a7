"""The repo-root folders install as subpackages of one import package, and nothing generic leaks."""
import importlib
import importlib.util
import pathlib
import subprocess
import sys

import pytest

import qwen3vl

REPO = pathlib.Path(qwen3vl.__file__).resolve().parent
SUBPACKAGES = ["model", "parallel", "data", "train", "launch"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_maps_to_repo_root_folder(name):
    module = importlib.import_module(f"qwen3vl.{name}")
    assert pathlib.Path(module.__file__).resolve().parent == REPO / name


def test_no_generic_top_level_package_is_installed(tmp_path):
    # A fresh interpreter outside the checkout sees only what the install put on the path.
    names = SUBPACKAGES + ["recipes", "tests"]
    probe = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", f"generic packages leaked into site-packages: {found.stdout}"
def test_stage_recipes_ship_as_package_data():
    names = {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert {"stage0_align.yaml", "stage1_mm.yaml", "stage2_32k.yaml", "stage3_256k.yaml"} <= names
