"""qwen3vl-convert: HF -> megatron -> HF round trips, refusals, exports of training checkpoints saved under
parallel layouts, dtypes and workers, and verify under parallel layouts.

The HF directories are tiny random models written by transformers' ``save_pretrained`` (dense untied,
dense tied, MoE in the 5.x expert layout) plus a release-layout MoE variant (experts [E, H, 2I] /
[E, I, H], sharded with an index, config written by "4.57") written by our own streaming writer; every
file we write is read back with safetensors' own loader. Conversions run in the persistent one-rank
worker of the test harness; exports of checkpoints need no process group and run in the test process;
verify runs in the workers on one, two ranks (TP2, TP2 with sequence parallelism on MoE, PP2, EP2, CP2)
and four (PP2·CP2, TP2·EP2 with SP on MoE), and once through the command line to cover the torchrun
path and the output format.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwen3vl.model.interop.hf_checkpoint import CheckpointMismatchError, open_hf_checkpoint, write_hf_checkpoint
from qwen3vl.model.interop.safetensors_files import read_index
from qwen3vl_testing.distributed import run_distributed

VERIFY_TOL = 1e-4
VARIANTS = ("tiny", "tiny-tied", "tiny-moe", "tiny-moe-release")
SHARD_BYTES = 30_000_000  # several files for the tiny models (the embedding alone is 39 MB)


def _preset(variant: str):
    from qwen3vl.model.presets import get_preset

    if variant == "tiny-tied":
        return replace(get_preset("tiny"), tie_word_embeddings=True)
    return get_preset("tiny-moe" if variant.startswith("tiny-moe") else "tiny")


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory as stored, read by safetensors itself."""
    from safetensors.torch import load_file

    out = {}
    for file in {spec.file for spec in read_index(directory).values()}:
        out.update(load_file(directory / file))
    return out


def canonical_tensors(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_hf_checkpoint(directory)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    from qwen3vl.model.interop.hf_reference import build_hf_model

    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for variant in ("tiny", "tiny-tied", "tiny-moe"):
        dirs[variant] = root / variant
        build_hf_model(_preset(variant), seed=len(dirs)).save_pretrained(dirs[variant])
    # The original release layout, as its 4.x-era checkpoints store it, in several shards.
    moe = open_hf_checkpoint(dirs["tiny-moe"])
    dirs["tiny-moe-release"] = write_hf_checkpoint(
        root / "tiny-moe-release", dict(moe.config, transformers_version="4.57.0.dev0"),
        [[name] for name in sorted(moe.tensors)], lambda names: [moe.read(n) for n in names], moe.dtype,
        expert_layout="release", max_shard_bytes=SHARD_BYTES)
    return dirs


def _convert_both_ways(jobs: list[tuple[str, str, str]]) -> None:
    from qwen3vl.launch.convert_commands import hf_to_mcore, mcore_to_hf

    for hf_dir, ckpt, out in jobs:
        hf_to_mcore(hf_dir, ckpt)
        mcore_to_hf(ckpt, out, max_shard_bytes=SHARD_BYTES)  # default flags: same expert layout back


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """variant -> (our checkpoint, the HF directory exported back from it)."""
    root = tmp_path_factory.mktemp("converted")
    out = {v: (root / f"{v}.mcore", root / f"{v}.hf") for v in VARIANTS}
    jobs = [(str(hf_dirs[v]), str(out[v][0]), str(out[v][1])) for v in VARIANTS]
    run_distributed(_convert_both_ways, world_size=1, timeout=300, jobs=jobs)
    return out


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


# ---------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_gives_back_the_same_files(variant, hf_dirs, converted):
    assert_same_tensors(stored_tensors(converted[variant][1]), stored_tensors(hf_dirs[variant]))
    assert json.loads((converted[variant][1] / "config.json").read_text()) == \
        json.loads((hf_dirs[variant] / "config.json").read_text())
    if variant == "tiny-tied":
        assert "lm_head.weight" not in stored_tensors(converted[variant][1])


def test_export_loads_in_transformers(converted):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(converted["tiny-moe-release"][1])
    expected = canonical_tensors(converted["tiny-moe"][1])  # same weights, 5.x layout
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ---------------------------------------------------------------------------------------------
# Refusals


def _copy_with(src: Path, dst: Path, *, config=None, drop=(), add=None) -> Path:
    from safetensors.torch import save_file

    checkpoint = stored_tensors(src)
    for name in drop:
        checkpoint.pop(name)
    checkpoint.update(add or {})
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config or json.loads((src / "config.json").read_text())))
    return dst


def test_missing_key_is_named(hf_dirs, tmp_path):
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    bad = _copy_with(hf_dirs["tiny"], tmp_path / "bad", drop=[name])
    with pytest.raises(CheckpointMismatchError, match=f"missing keys.*{name}"):
        open_hf_checkpoint(bad)


def test_shape_mismatch_names_key_and_both_shapes(hf_dirs, tmp_path):
    config = json.loads((hf_dirs["tiny"] / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    bad = _copy_with(hf_dirs["tiny"], tmp_path / "bad", config=config)
    with pytest.raises(CheckpointMismatchError,
                       match=r"layers\.0\.mlp\.down_proj\.weight: checkpoint shape \[64, 128\] but the config "
                             r"implies \[64, 96\]"):
        open_hf_checkpoint(bad)


def test_expert_shape_fitting_neither_layout_is_refused(hf_dirs, tmp_path):
    config = json.loads((hf_dirs["tiny-moe"] / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 16
    bad = _copy_with(hf_dirs["tiny-moe"], tmp_path / "bad", config=config)
    with pytest.raises(CheckpointMismatchError, match=r"experts\.(gate_up|down)_proj: checkpoint shape \[8, \d+, \d+\] fits neither"):
        open_hf_checkpoint(bad)


def test_tied_config_with_lm_head_is_refused(hf_dirs, tmp_path):
    embedding = stored_tensors(hf_dirs["tiny-tied"])["model.language_model.embed_tokens.weight"]
    bad = _copy_with(hf_dirs["tiny-tied"], tmp_path / "bad", add={"lm_head.weight": embedding.clone()})
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings=true but the weights contain lm_head"):
        open_hf_checkpoint(bad)


def test_untied_config_without_lm_head_is_refused(hf_dirs, tmp_path):
    bad = _copy_with(hf_dirs["tiny"], tmp_path / "bad", drop=["lm_head.weight"])
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings=false but the weights have no lm_head"):
        open_hf_checkpoint(bad)


def test_verify_refuses_a_checkpoint_of_another_model(hf_dirs, converted):
    from qwen3vl.launch.convert_verify import check_same_architecture
    from qwen3vl.model.interop.mcore_checkpoint import read_checkpoint_architecture

    ours = read_checkpoint_architecture(converted["tiny-moe"][0]).model
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
# dtype and workers


def _convert_bf16_with_workers(hf_dir: str, ckpt: str, out: str) -> None:
    from qwen3vl.launch.convert_commands import hf_to_mcore, mcore_to_hf

    hf_to_mcore(hf_dir, ckpt, dtype="bfloat16", workers=2)
    mcore_to_hf(ckpt, out, max_shard_bytes=SHARD_BYTES, workers=2)


def test_dtype_and_workers(hf_dirs, converted, tmp_path):
    """--dtype bfloat16 into our checkpoint, two workers both ways: the export is the source cast to bf16;
    --dtype float32 out of it widens exactly."""
    from qwen3vl.launch.convert_commands import mcore_to_hf
    from qwen3vl.launch.convert_verify import weight_differences
    from qwen3vl.model.interop.dist_reader import DistCheckpointReader
    from qwen3vl.model.interop.mcore_checkpoint import read_checkpoint_architecture

    ckpt, out = tmp_path / "bf16.mcore", tmp_path / "bf16.hf"
    run_distributed(_convert_bf16_with_workers, world_size=1, timeout=300, hf_dir=str(hf_dirs["tiny-moe-release"]),
                    ckpt=str(ckpt), out=str(out))
    assert DistCheckpointReader(ckpt).model_dtype() == torch.bfloat16
    source = stored_tensors(hf_dirs["tiny-moe-release"])
    assert_same_tensors(stored_tensors(out), {k: v.to(torch.bfloat16) for k, v in source.items()})
    assert len({spec.file for spec in read_index(out).values()}) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    mcore_to_hf(ckpt, tmp_path / "fp32.hf", dtype="float32", expert_layout="hf5")
    expected = {k: v.to(torch.bfloat16).float() for k, v in canonical_tensors(hf_dirs["tiny-moe"]).items()}
    assert_same_tensors(stored_tensors(tmp_path / "fp32.hf"), expected)
    # verify's weight check sees the bf16 rounding, and where it is largest.
    config = read_checkpoint_architecture(ckpt).model
    worst, where, count = weight_differences(str(hf_dirs["tiny-moe"]), ckpt, config)
    rounding = {k: (v.to(torch.bfloat16).double() - v.double()).abs().max().item()
                for k, v in canonical_tensors(hf_dirs["tiny-moe"]).items()}
    assert count == len(rounding) and worst == max(rounding.values()) > 0 and rounding[where] == worst


# ---------------------------------------------------------------------------------------------
# Export of training checkpoints, saved under any layout


def _digest(tensor: torch.Tensor) -> str:
    """Bitwise fingerprint (results travel back from the worker; the full tensors are 80 MB)."""
    import hashlib

    return f"{tensor.dtype}{list(tensor.shape)}" + hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _save_training_checkpoint(run_dir: str, config_yaml: str, overrides: dict) -> dict[str, str]:
    """A run directory with one training checkpoint (model + distributed optimizer state); returns the
    digests of its weights under their HF names."""
    from megatron.core.optimizer import OptimizerConfig

    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.hf_weights import mcore_to_hf_state_dict
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.parallel.zero1 import wrap_for_training
    from qwen3vl.train.checkpoint import TrainState, save_checkpoint
    from qwen3vl.train.config import ModelCfg, Qwen3VLTrainConfig
    from qwen3vl.train.config_checks import build_model_config

    layout = ParallelLayout()
    initialize_parallel(layout)
    config = build_model_config(Qwen3VLTrainConfig(model=ModelCfg(preset="tiny", overrides=overrides)))
    chunks = build_model_chunks(config)
    ddp_chunks, optimizer = wrap_for_training(chunks, layout, OptimizerConfig(optimizer="adam", lr=1e-3))
    save_checkpoint(run_dir, TrainState(step=3), ddp_chunks, optimizer, config_yaml=config_yaml)
    own = {k: v for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    return {name: _digest(t) for name, t in mcore_to_hf_state_dict(own, config).items()}


def test_export_of_a_run_directory_takes_its_latest_checkpoint(tmp_path):
    """The export of a run directory is its latest checkpoint's model, read through model_config.json,
    and a checkpoint from before that file existed is read through its config.yaml."""
    from qwen3vl.launch.convert_commands import checkpoint_architecture, mcore_to_hf
    from qwen3vl.model.interop.mcore_checkpoint import MODEL_CONFIG_FILE, read_checkpoint_architecture
    from qwen3vl.train.checkpoint import find_latest
    from qwen3vl.train.config import ModelCfg, Qwen3VLTrainConfig, to_yaml

    run_dir = tmp_path / "run"
    overrides = {"text.rms_norm_eps": 1e-5}
    config_yaml = to_yaml(Qwen3VLTrainConfig(model=ModelCfg(preset="tiny", overrides=overrides)))
    expected = run_distributed(_save_training_checkpoint, world_size=1, timeout=600, run_dir=str(run_dir),
                               config_yaml=config_yaml, overrides=overrides)[0]
    latest = find_latest(run_dir)
    assert read_checkpoint_architecture(latest).model.text.rms_norm_eps == 1e-5
    mcore_to_hf(run_dir, tmp_path / "hf")
    exported = stored_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(expected)
    assert all(_digest(exported[name]) == digest for name, digest in expected.items())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["rms_norm_eps"] == 1e-5
    recorded = read_checkpoint_architecture(latest).model
    (latest / MODEL_CONFIG_FILE).unlink()
    assert checkpoint_architecture(latest).model == recorded


def _save_under_layout(hf_dir: str, run_dir: str, layout: dict, pipeline_layers) -> None:
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.hf_config import config_from_hf
    from qwen3vl.model.interop.hf_weights import hf_to_mcore_state_dict
    from qwen3vl.model.interop.state_dict_sharding import load_full_state_dict
    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.train.checkpoint import TrainState, save_checkpoint

    initialize_parallel(ParallelLayout(**layout))
    hf = open_hf_checkpoint(hf_dir)
    config = config_from_hf(hf.config)
    [chunk] = build_model_chunks(config, pipeline_layers=pipeline_layers,
                                 sequence_parallel=layout.get("sequence_parallel", False))
    load_full_state_dict(chunk, hf_to_mcore_state_dict({n: hf.read(n) for n in hf.tensors}, config))
    save_checkpoint(run_dir, TrainState(step=1), [chunk])


@pytest.mark.parametrize("variant, layout, pipeline_layers", [
    pytest.param("tiny", dict(tp=2), None, id="tp2"),
    pytest.param("tiny-tied", dict(pp=2), (3, 1), id="pp2-tied"),
    pytest.param("tiny-moe", dict(ep=2), None, id="ep2-moe"),
])
def test_export_of_a_checkpoint_saved_under_a_parallel_layout(variant, layout, pipeline_layers, hf_dirs,
                                                             tmp_path, monkeypatch):
    """Saved by two ranks, exported by this process without a model or a process group: the source back."""
    import torch.distributed as dist

    from qwen3vl.launch.convert_commands import mcore_to_hf

    run_distributed(_save_under_layout, world_size=2, timeout=300,
                    hf_dir=str(hf_dirs[variant]), run_dir=str(tmp_path / "run"), layout=layout,
                    pipeline_layers=pipeline_layers)

    def no_process_group(*args, **kwargs):
        raise AssertionError("the export started a process group")

    monkeypatch.setattr(dist, "init_process_group", no_process_group)
    mcore_to_hf(tmp_path / "run", tmp_path / "hf")
    assert_same_tensors(stored_tensors(tmp_path / "hf"), stored_tensors(hf_dirs[variant]))


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


@pytest.mark.parametrize("variant, layout", [
    pytest.param("tiny", dict(pp=2, cp=2, pipeline_layers=(3, 1)), id="pp2-cp2"),
    pytest.param("tiny-moe", dict(tp=2, ep=2, sequence_parallel=True), id="tp2-ep2-sp-moe"),
])
def test_verify_four_ranks(variant, layout, hf_dirs, converted):
    """The production layouts of the large presets: PP with CP (32B/235B at 32K-256K), TP·EP·SP for MoE."""
    diffs = run_distributed(_verify, world_size=4, timeout=600, hf_dir=str(hf_dirs[variant]),
                            ckpt=str(converted[variant][0]), **layout)
    assert all(d == diffs[0] for d in diffs) and diffs[0] <= VERIFY_TOL


def test_verify_command_line_under_torchrun(hf_dirs, converted):
    done = subprocess.run([sys.executable, "-m", "qwen3vl.launch.convert", "verify", "--hf",
                           str(hf_dirs["tiny-moe"]), "--ckpt", str(converted["tiny-moe"][0]), "--ep", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    [weights] = [line for line in lines if line.startswith("weights: ")]
    count = len(read_index(hf_dirs["tiny-moe"]))
    assert weights.startswith(f"weights: max_abs_diff=0.000000e+00 over {count} tensors"), weights
    assert lines[-1].startswith("max_abs_diff=") and float(lines[-1].split("=", 1)[1]) <= VERIFY_TOL
