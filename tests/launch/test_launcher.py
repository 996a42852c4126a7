"""qwen3vl-launch: the torchrun command it builds, validation before any rank starts, exit codes, and the
public demo command end to end (run, then the same command with more steps resumes)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from qwen3vl.launch import launcher
from qwen3vl.train.config import parse_app_argv

DEMO = ["model=tiny", "data=demo"]


def _dry_run(capsys, argv: list[str]) -> list[str]:
    assert launcher.main(argv) == 0
    return shlex.split(capsys.readouterr().out.strip().splitlines()[-1])


def test_single_node_command(capsys, tmp_path):
    cmd = _dry_run(capsys, ["--nproc", "2", "--recipe", "stage0_align", "--dry-run", "--",
                            *DEMO, "run_dir=rel/run", "train.steps=4", "train.save_interval=2"])
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    app = cmd[cmd.index("qwen3vl.train.app") + 1:]
    recipe, overrides = parse_app_argv(app)
    assert recipe == "stage0_align"
    run_dir = Path("rel/run").resolve()
    assert overrides[:4] == [*DEMO, "train.steps=4", "train.save_interval=2"]
    assert overrides[4] == f"run_dir={run_dir}"  # absolute, once: every rank writes the same place
    assert overrides[5].startswith("data.demo_dir=/")


def test_multi_node_commands(capsys):
    common = ["--nproc", "8", "--nnodes", "4", "--recipe", "stage1_mm", "--dry-run"]
    over = ["--", "model=tiny", "data=demo", "parallel.tp=2", "train.global_batch_tokens=16384"]
    static = _dry_run(capsys, [*common, "--node-rank", "3", "--master-addr", "n0", "--master-port", "6000", *over])
    assert static[3:15] == ["--nproc_per_node", "8", "--nnodes", "4", "--node_rank", "3", "--master_addr", "n0",
                            "--master_port", "6000", "-m", "qwen3vl.train.app"]
    rdzv = _dry_run(capsys, [*common, "--rdzv-endpoint", "n0:29400", "--rdzv-id", "job7", *over])
    assert rdzv[3:13] == ["--nproc_per_node", "8", "--nnodes", "4", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                          "n0:29400", "--rdzv_id", "job7"]
    assert launcher.main(common + over) == launcher.CONFIG_ERROR_EXIT  # several nodes need an address
    assert "--master-addr" in capsys.readouterr().err


def test_bad_config_fails_before_any_rank_starts(capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("torchrun must not start for an invalid config")

    monkeypatch.setattr(subprocess, "Popen", never)
    code = launcher.main(["--nproc", "2", "--recipe", "stage0_align", "--", *DEMO, "parallel.pp=4"])
    assert code == launcher.CONFIG_ERROR_EXIT and not dist.is_initialized()
    err = capsys.readouterr().err
    assert "world size 2 is not divisible by tp·pp·cp" in err and "DeepStack" in err
    code = launcher.main(["--nproc", "2", "--recipe", "stage0_align", "--", *DEMO,
                          "data.datasets=[{name: x, shards: '/nowhere/s-{0..3}.tar'}]"])
    assert code == launcher.CONFIG_ERROR_EXIT and "shard /nowhere/s-0.tar does not exist" in capsys.readouterr().err


def test_exit_code_and_cpu_threads():
    env = launcher.rank_environment(2, cuda=False)
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert launcher.run([sys.executable, "-c", "import sys; sys.exit(3)"], env) == 3


def _launch(run_dir: Path, demo_dir: Path, steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwen3vl.launch.launcher", "--nproc", "2", "--recipe", "stage0_align", "--",
           *DEMO, f"run_dir={run_dir}", f"train.steps={steps}", "train.save_interval=1",
           f"data.demo_dir={demo_dir}", "wandb.mode=disabled", "train.global_batch_tokens=2048"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400)


def test_public_demo_command_runs_and_resumes(tmp_path):
    """The README form on 2 CPU ranks; the same command with more steps continues the run."""
    if not (Path(launcher.__file__).parent.parent / "train" / "app.py").is_file():
        pytest.fail("qwen3vl.train.app is missing")
    run_dir, demo_dir = tmp_path / "run", tmp_path / "demo"
    first = _launch(run_dir, demo_dir, steps=1)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _launch(run_dir, demo_dir, steps=2)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]  # step 1 was not trained again
    assert lines[1]["tokens_total"] == lines[0]["tokens"] + lines[1]["tokens"]
    assert "resumed" in second.stderr + second.stdout
    assert (run_dir / "loss.png").is_file() and (demo_dir / "manifest.json").is_file()
