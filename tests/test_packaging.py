"""The repo-root folders install as subpackages of one import package, and nothing generic leaks."""
import importlib
import importlib.util
import pathlib
import runpy
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


def setup_arguments() -> dict:
    """What setup.py passes to setuptools.setup (the file run as pip runs it, setup() captured)."""
    from unittest import mock

    import setuptools

    captured: dict = {}
    with mock.patch.object(setuptools, "setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(str(REPO / "setup.py"))
    return captured


def test_every_package_folder_is_installed():
    # setup.py lists its packages by hand: a new folder with an __init__.py must be listed too.
    seen = setup_arguments()
    folders = {"qwen3vl." + ".".join(init.parent.relative_to(REPO).parts)
               for name in SUBPACKAGES for init in (REPO / name).rglob("__init__.py")}
    assert folders <= set(seen["packages"]), f"not installed by setup.py: {sorted(folders - set(seen['packages']))}"


def test_no_generic_top_level_package_is_installed(tmp_path):
    # A fresh interpreter outside the checkout sees only what the install put on the path.
    names = SUBPACKAGES + ["recipes", "tests"]
    probe = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", f"generic packages leaked into site-packages: {found.stdout}"
def test_stage_recipes_ship_as_package_data():
    names = {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert {"stage0_align.yaml", "stage1_mm.yaml", "stage2_32k.yaml", "stage3_256k.yaml"} <= names


def requirements(*extras: str):
    from packaging.requirements import Requirement

    args = setup_arguments()
    lines = list(args["install_requires"]) + [r for extra in extras for r in args["extras_require"][extra]]
    return {Requirement(line).name: Requirement(line) for line in lines}


def test_setup_declares_ranges_and_constraints_pin_each_inside_its_range():
    """F8: exact pins live in constraints.txt (the README's and CI's installs); setup.py declares ranges, so
    installing into a GPU environment does not replace its torch. megatron-core stays exact on purpose."""
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    declared = requirements("test", "convert", "video")
    assert set(pins) == {canonicalize_name(name) for name in declared}, "constraints.txt and setup.py differ"
    for name, requirement in declared.items():
        assert requirement.specifier.contains(pins[canonicalize_name(name)]), f"{name}: pin outside {requirement}"
    exact = [name for name, r in requirements().items() if any(s.operator == "==" for s in r.specifier)]
    assert exact == ["megatron-core"]


def test_torch_range_keeps_the_torch_of_gpu_environments():
    """The GPU machine's torch 2.11, CI's 2.13 and an NGC container's pre-release build all satisfy the range
    (pip keeps an installed pre-release that a range contains), and the floor is megatron-core 0.16.1's."""
    import importlib.metadata

    from packaging.requirements import Requirement

    ours = requirements()["torch"].specifier
    for version in ("2.11.0+cu130", "2.13.0", "2.13.0+cpu", "2.8.0a0+5228986c39.nv25.6", "3.0.0"):
        assert ours.contains(version, prereleases=True), version
    theirs = next(Requirement(r) for r in importlib.metadata.requires("megatron-core") if r.startswith("torch"))
    floors = [s.version for s in ours if s.operator == ">="]
    assert floors and all(theirs.specifier.contains(v) for v in floors)
    assert not ours.contains("2.5.1")


def test_gpu_extra_takes_the_transformer_engine_releases_megatron_core_supports():
    import importlib.metadata

    from packaging.requirements import Requirement

    ours = Requirement(setup_arguments()["extras_require"]["gpu"][0])
    theirs = next(Requirement(r) for r in importlib.metadata.requires("megatron-core")
                  if r.startswith("transformer-engine") and 'extra == "dev"' in r)
    assert ours.name == theirs.name and "pytorch" in ours.extras
    for version in ("2.8.0", "2.9.0", "2.10.0", "2.11.0", "2.11.5", "2.12.0", "2.13.0"):
        assert ours.specifier.contains(version) == theirs.specifier.contains(version), version
