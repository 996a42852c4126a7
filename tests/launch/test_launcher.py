"""qwen3vl-launch: the torchrun command it builds, validation before any rank starts, exit codes, and the
public demo command end to end (run, then the same command with more steps continues exactly, a quiet
console, wandb offline recording every step)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from qwen3vl_testing import wandb_offline
from qwen3vl_testing.reference_run import S0_STAGE, S0_STEPS, trace
from qwen3vl.launch import launcher
from qwen3vl.train.config import parse_app_argv
from qwen3vl.train.metrics import read_metrics

DEMO = ["model=tiny", "data=demo", "parallel.cp=1"]  # S0 as data parallelism on the CPU ranks


def _dry_run(capsys, argv: list[str]) -> list[str]:
    assert launcher.main(argv) == 0
    return shlex.split(capsys.readouterr().out.strip().splitlines()[-1])


def test_single_node_command(capsys, tmp_path):
    cmd = _dry_run(capsys, ["--nproc", "2", "--recipe", "stage0_align", "--dry-run", "--",
                            *DEMO, "run_dir=rel/run", "train.steps=4", "train.save_interval=2"])
    assert cmd[:6] == [sys.executable, "-m", "qwen3vl.launch.elastic", "--nproc_per_node", "2", "--standalone"]
    app = cmd[cmd.index("qwen3vl.train.app") + 1:]
    recipe, overrides = parse_app_argv(app)
    assert recipe == "stage0_align"
    run_dir = Path("rel/run").resolve()
    given = len(DEMO) + 2
    assert overrides[:given] == [*DEMO, "train.steps=4", "train.save_interval=2"]
    assert overrides[given] == f"run_dir={run_dir}"  # absolute, once: every rank writes the same place
    assert overrides[given + 1].startswith("data.demo_dir=/")


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
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU run's ranks never see a GPU
    assert launcher.run([sys.executable, "-c", "import sys; sys.exit(3)"], env) == 3


def _launch(run_dir: Path, demo_dir: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwen3vl.launch.launcher", "--nproc", "2", "--recipe", "stage0_align", "--",
           *S0_STAGE, f"run_dir={run_dir}", f"data.demo_dir={demo_dir}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # wandb's default: offline
    env["OMP_NUM_THREADS"] = "1"  # as the reference's ranks
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)


def _noise(output: str) -> list[str]:
    """Console lines besides the launcher's banner, the progress and evaluation lines, rank 0's own log lines
    (e.g. "resumed ... at step 3") and its final line: warnings and anything else a user did not ask for."""
    expected = ("qwen3vl-launch: ", "  " + sys.executable, "stage0_align step ", "stage0_align eval step ",
                "[qwen3vl-train] ")
    return [line for line in output.splitlines()
            if not line.startswith(expected) and not re.match(r"\S+ \S+ qwen3vl\.[\w.]+: ", line)]


def test_same_command_with_more_steps_continues_exactly_and_wandb_records_it(tmp_path, demo_dir, s0_reference):
    """The README form on 2 CPU ranks: train.steps=3 of a 6-step stage, then the same command with
    train.steps=6 equals the straight run (warmup 2 and cosine decay, so a schedule tied to the stop would
    show); wandb, offline by default, holds every metrics.jsonl field at its step, in one run id."""
    run_dir = tmp_path / "run"
    first = _launch(run_dir, demo_dir, "train.steps=3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    noise = _noise(first.stdout + first.stderr)
    assert len(noise) <= 5, "\n".join(noise)  # a demo stage: at most 5 warning lines
    assert "stage0_align step 3/3 of 6 (100%)" in first.stdout
    second = _launch(run_dir, demo_dir, "train.steps=6")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed" in second.stderr + second.stdout and len(_noise(second.stdout + second.stderr)) <= 5

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, S0_STEPS + 1))  # steps 1-3 were not trained again
    assert trace(records) == s0_reference
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # warmup, then decay
    assert records[3]["tokens_total"] == sum(r["tokens"] for r in records[:4])
    assert [(r["backend"], r["device"]) for r in records if "backend" in r] == [("gloo", "cpu")] * 2  # each run says where
    assert all(r["peak_memory_bytes"] > 2 ** 20 and r["data_wait_s"] >= 0 for r in records)
    assert (run_dir / "loss.png").is_file()

    runs = wandb_offline.offline_runs(run_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert [wandb_offline.run_id(r) for r in runs] == [run_id, run_id]  # one wandb run, resumed
    logged = {step: row for r in runs for step, row in wandb_offline.history(r).items()}
    # Step 0: the demo's held-out evaluation before the first step (eval.at_start), a row of its own.
    assert sorted(logged) == [0] + [r["step"] for r in records]
    assert "eval/heldout/loss_sqrt" in logged[0] and "eval/heldout/loss_sqrt" in logged[S0_STEPS]  # and at the end
    for r in records:
        row = logged[r["step"]]
        metrics = wandb_offline.flatten({k: v for k, v in r.items() if k != "datasets"})  # datasets: the config's
        assert {k: row.get(k, "missing") for k in metrics} == metrics
    last = wandb_offline.summary(runs[-1])
    assert last["run_id"] == run_id and last["summary"]["loss"] == records[-1]["loss"]
    assert last["config"]["datasets"] == records[S0_STEPS // 2]["datasets"]  # the resumed run's first line
    assert last["summary"]["_step"] == S0_STEPS


def test_a_failed_run_waits_for_its_leftover_processes_before_the_report():
    """The failure report waits for the processes carrying the run's marker (a killed rank's data workers
    and resource tracker, whose warnings would otherwise follow the report), and no longer than its limit."""
    marker = f"{launcher.RUN_MARKER}=test-{os.getpid()}"
    env = {**os.environ, launcher.RUN_MARKER: marker.split("=", 1)[1]}

    def waited(timeout_s: float, which: str = marker) -> float:
        started = time.monotonic()
        launcher.wait_for_leftovers(which, timeout_s)
        return time.monotonic() - started

    def leftover(seconds: int) -> subprocess.Popen:
        """A process of the run, returned once it is running Python: just after exec, /proc shows an empty
        environment for a moment (measured: 169 of 200 reads right after Popen), which is not a leftover's
        state at a failure, whose workers have long been running."""
        proc = subprocess.Popen([sys.executable, "-c", f"import time; print('up', flush=True); time.sleep({seconds})"],
                                env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "up\n"
        return proc

    assert waited(10) < 1  # nothing of the run left: no wait
    procs = []
    try:
        procs.append(leftover(2))
        assert 1.9 < waited(10) < 9  # until the leftover exited
        assert procs[0].poll() is not None
        procs.append(leftover(30))
        assert 1.4 < waited(1.5) < 5 and procs[1].poll() is None  # gave up at the limit
        assert waited(10, f"{launcher.RUN_MARKER}=another-run") < 1  # another run's processes: not waited for
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
