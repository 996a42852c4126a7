"""qwen3vl-convert: HF -> megatron -> HF round trips, refusals, and verify under parallel layouts.

The HF directories are tiny random models written by transformers' ``save_pretrained`` (dense untied,
dense tied, MoE in the 5.x expert layout) plus a hand-written release-layout MoE variant (experts
[E, H, 2I] / [E, I, H], sharded with an index, config written by "4.57"). Conversions run in the
persistent one-rank worker of the test harness; verify runs there and on two ranks (TP2, TP2 with
sequence parallelism on MoE, PP2, EP2, CP2), and once through the command line to cover the torchrun path and the output format.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwen3vl.model.hf_checkpoint import (CheckpointMismatchError, load_hf_checkpoint, read_safetensors,
                                         save_hf_checkpoint)
from qwen3vl.parallel.testing import run_distributed

VERIFY_TOL = 1e-4
VARIANTS = ("tiny", "tiny-tied", "tiny-moe", "tiny-moe-release")


def _preset(variant: str):
    from qwen3vl.model.presets import get_preset

    if variant == "tiny-tied":
        return replace(get_preset("tiny"), tie_word_embeddings=True)
    return get_preset("tiny-moe" if variant.startswith("tiny-moe") else "tiny")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    from qwen3vl.model.hf_reference import build_hf_model

    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for variant in ("tiny", "tiny-tied", "tiny-moe"):
        dirs[variant] = root / variant
        build_hf_model(_preset(variant), seed=len(dirs)).save_pretrained(dirs[variant])
    # The original release layout, as its 4.x-era checkpoints store it, in several shards.
    moe = load_hf_checkpoint(dirs["tiny-moe"])
    dirs["tiny-moe-release"] = save_hf_checkpoint(
        root / "tiny-moe-release", dict(moe.config, transformers_version="4.57.0.dev0"), moe.state_dict,
        expert_layout="release", max_shard_bytes=30_000_000)
    return dirs


def _convert_both_ways(jobs: list[tuple[str, str, str]]) -> None:
    from qwen3vl.launch.convert_commands import hf_to_mcore, mcore_to_hf

    for hf_dir, ckpt, out in jobs:
        hf_to_mcore(hf_dir, ckpt)
        mcore_to_hf(ckpt, out, max_shard_bytes=30_000_000)  # default flags: same expert layout back


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """variant -> (our checkpoint, the HF directory exported back from it)."""
    root = tmp_path_factory.mktemp("converted")
    out = {v: (root / f"{v}.mcore", root / f"{v}.hf") for v in VARIANTS}
    jobs = [(str(hf_dirs[v]), str(out[v][0]), str(out[v][1])) for v in VARIANTS]
    run_distributed(_convert_both_ways, world_size=1, timeout=300, jobs=jobs)
    return out


# ---------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_gives_back_the_same_files(variant, hf_dirs, converted):
    source, back = read_safetensors(hf_dirs[variant]), read_safetensors(converted[variant][1])
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert json.loads((converted[variant][1] / "config.json").read_text()) == \
        json.loads((hf_dirs[variant] / "config.json").read_text())
    if variant == "tiny-tied":
        assert "lm_head.weight" not in back


def test_export_loads_in_transformers(converted):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(converted["tiny-moe-release"][1])
    expected = load_hf_checkpoint(converted["tiny-moe"][1]).state_dict  # same weights, 5.x layout
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ---------------------------------------------------------------------------------------------
# Refusals


def _copy_with(src: Path, dst: Path, *, config=None, drop=(), add=None) -> Path:
    checkpoint = read_safetensors(src)
    for name in drop:
        checkpoint.pop(name)
    checkpoint.update(add or {})
    from safetensors.torch import save_file

    dst.mkdir()
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config or json.loads((src / "config.json").read_text())))
    return dst


def test_missing_key_is_named(hf_dirs, tmp_path):
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    bad = _copy_with(hf_dirs["tiny"], tmp_path / "bad", drop=[name])
    with pytest.raises(CheckpointMismatchError, match=f"missing keys.*{name}"):
        load_hf_checkpoint(bad)


def test_shape_mismatch_names_key_and_both_shapes(hf_dirs, tmp_path):
    config = json.loads((hf_dirs["tiny"] / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    bad = _copy_with(hf_dirs["tiny"], tmp_path / "bad", config=config)
    with pytest.raises(CheckpointMismatchError,
                       match=r"layers\.0\.mlp\.down_proj\.weight: checkpoint shape \[64, 128\] but the config "
                             r"implies \[64, 96\]"):
        load_hf_checkpoint(bad)


def test_expert_shape_fitting_neither_layout_is_refused(hf_dirs, tmp_path):
    config = json.loads((hf_dirs["tiny-moe"] / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 16
    bad = _copy_with(hf_dirs["tiny-moe"], tmp_path / "bad", config=config)
    with pytest.raises(CheckpointMismatchError, match=r"experts\.(gate_up|down)_proj: checkpoint shape \[8, \d+, \d+\] fits neither"):
        load_hf_checkpoint(bad)


def test_tied_config_with_lm_head_is_refused(hf_dirs, tmp_path):
    embedding = read_safetensors(hf_dirs["tiny-tied"])["model.language_model.embed_tokens.weight"]
    bad = _copy_with(hf_dirs["tiny-tied"], tmp_path / "bad", add={"lm_head.weight": embedding.clone()})
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings=true but the weights contain lm_head"):
        load_hf_checkpoint(bad)


def test_untied_config_without_lm_head_is_refused(hf_dirs, tmp_path):
    bad = _copy_with(hf_dirs["tiny"], tmp_path / "bad", drop=["lm_head.weight"])
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings=false but the weights have no lm_head"):
        load_hf_checkpoint(bad)


def test_verify_refuses_a_checkpoint_of_another_model(hf_dirs, converted):
    from qwen3vl.launch.convert_verify import check_same_architecture
    from qwen3vl.model.mcore_checkpoint import read_checkpoint_config

    ours = read_checkpoint_config(converted["tiny-moe"][0]).model
    with pytest.raises(CheckpointMismatchError, match="text.num_experts: checkpoint 8, HF config.json 0"):
        check_same_architecture(ours, str(hf_dirs["tiny"]))


def test_cli_reports_a_mismatch_in_one_line_and_exit_code_2(hf_dirs, tmp_path, capsys):
    from qwen3vl.launch.convert import main

    bad = _copy_with(hf_dirs["tiny"], tmp_path / "bad", drop=["lm_head.weight"])
    with pytest.raises(SystemExit) as exit_info:
        main(["hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "ckpt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3vl-convert hf-to-mcore: error: config.json says tie_word_embeddings=false")
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# Export of a training run


def _save_training_checkpoint(run_dir: str, config_yaml: str) -> dict:
    """A run directory with one training checkpoint (model + distributed optimizer state)."""
    from megatron.core.optimizer import OptimizerConfig

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.hf_weights import mcore_to_hf_state_dict
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.parallel.zero1 import wrap_for_training
    from qwen3vl.train.checkpoint import TrainState, save_checkpoint

    layout = ParallelLayout()
    initialize_parallel(layout)
    config = read_checkpoint_config_from_yaml(config_yaml)
    chunks = build_model_chunks(config)
    ddp_chunks, optimizer = wrap_for_training(chunks, layout, OptimizerConfig(optimizer="adam", lr=1e-3))
    save_checkpoint(run_dir, TrainState(step=3), ddp_chunks, optimizer, config_yaml=config_yaml)
    own = {k: v for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    return {name: _digest(t) for name, t in mcore_to_hf_state_dict(own, config).items()}


def _digest(tensor: torch.Tensor) -> str:
    """Bitwise fingerprint (results travel back from the worker; the full tensors are 80 MB)."""
    import hashlib

    return f"{tensor.dtype}{list(tensor.shape)}" + hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def read_checkpoint_config_from_yaml(config_yaml: str):
    import tempfile

    from qwen3vl.model.mcore_checkpoint import read_checkpoint_config

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(config_yaml)
        return read_checkpoint_config(tmp).model


def _export(ckpt: str, out: str) -> None:
    from qwen3vl.launch.convert_commands import mcore_to_hf

    mcore_to_hf(ckpt, out)


def test_export_of_a_run_directory_takes_its_latest_checkpoint(tmp_path):
    from qwen3vl.train.config import ModelCfg, Qwen3VLTrainConfig, to_yaml

    run_dir = tmp_path / "run"
    config_yaml = to_yaml(Qwen3VLTrainConfig(model=ModelCfg(preset="tiny",
                                                             overrides={"text.rms_norm_eps": 1e-5})))
    expected = run_distributed(_save_training_checkpoint, world_size=1, timeout=600, run_dir=str(run_dir),
                               config_yaml=config_yaml)[0]
    run_distributed(_export, world_size=1, timeout=300, ckpt=str(run_dir), out=str(tmp_path / "hf"))
    exported = load_hf_checkpoint(tmp_path / "hf")
    assert sorted(exported.state_dict) == sorted(expected)
    for name, digest in expected.items():
        assert _digest(exported.state_dict[name]) == digest, name
    assert exported.config["text_config"]["rms_norm_eps"] == 1e-5


# ---------------------------------------------------------------------------------------------
# verify


def _verify(**kwargs) -> float:
    from qwen3vl.launch.convert_verify import verify_worker

    return verify_worker(**kwargs)


@pytest.mark.parametrize("variant", ("tiny-tied", "tiny-moe-release"))
def test_verify_single_rank(variant, hf_dirs, converted):
    [diff] = run_distributed(_verify, world_size=1, timeout=300, hf_dir=str(hf_dirs[variant]),
                             ckpt=str(converted[variant][0]))
    assert diff <= VERIFY_TOL


@pytest.mark.parametrize("variant, layout", [
    pytest.param("tiny", dict(tp=2), id="tp2"),
    pytest.param("tiny-moe", dict(tp=2, sequence_parallel=True), id="tp2-sp-moe"),
    pytest.param("tiny", dict(pp=2, pipeline_layers=(3, 1)), id="pp2"),
    pytest.param("tiny-moe-release", dict(ep=2), id="ep2"),
    pytest.param("tiny-tied", dict(cp=2), id="cp2"),
])
def test_verify_two_ranks(variant, layout, hf_dirs, converted):
    diffs = run_distributed(_verify, world_size=2, timeout=300, hf_dir=str(hf_dirs[variant]),
                            ckpt=str(converted[variant][0]), **layout)
    assert diffs[0] == diffs[1] and diffs[0] <= VERIFY_TOL


def test_verify_command_line_under_torchrun(hf_dirs, converted):
    done = subprocess.run([sys.executable, "-m", "qwen3vl.launch.convert", "verify", "--hf",
                           str(hf_dirs["tiny-moe"]), "--ckpt", str(converted["tiny-moe"][0]), "--ep", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=") and float(last.split("=", 1)[1]) <= VERIFY_TOL
