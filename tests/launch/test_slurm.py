"""The generated sbatch script: its #SBATCH lines, the rendezvous, quoting of overrides, CPU jobs, and the
preemption protocol (USR1 -> ranks checkpoint and exit 0 -> requeue), against fake Slurm commands and
against a real one-node Slurm on localhost (skipped where Slurm is not installed)."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qwen3vl_testing import slurm_cluster
from qwen3vl_testing.reference_run import S0_STAGE, S0_STEPS, trace
from qwen3vl.launch import launcher
from qwen3vl.launch.slurm import SlurmJob, node_command, sbatch_script
from qwen3vl.train.config import parse_app_argv
from qwen3vl.train.metrics import read_metrics

OVERRIDES = ["model=tiny", "data.root=/data/with space", "wandb.tags=[a,b]", "run_dir=/runs/s2"]


def test_script_from_the_launcher(capsys):
    argv = ["--slurm", "--nodes", "8", "--gpus-per-node", "8", "--partition", "gpu", "--time", "24:00:00",
            "--account", "proj", "--recipe", "stage2_32k", "--dry-run", "--skip-path-checks", "--", "run_dir=/runs/s2"]
    assert launcher.main(argv) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00", "#SBATCH --account=proj",
                 "#SBATCH --job-name=qwen3vl-stage2_32k", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --output=/runs/s2/slurm/%x-%j.out",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'):
        assert line in script.splitlines()
    assert "srun --kill-on-bad-exit=1 bash -c" in script
    assert '--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_validates_for_the_whole_job(capsys):
    # stage2_32k uses tp4·cp2 = 8 ranks per replica; 1 node of 4 GPUs cannot hold it.
    argv = ["--slurm", "--nodes", "1", "--gpus-per-node", "4", "--recipe", "stage2_32k", "--dry-run",
            "--skip-path-checks"]
    assert launcher.main(argv) == launcher.CONFIG_ERROR_EXIT
    assert "world size 4 is not divisible by tp·pp·cp = 4·1·2" in capsys.readouterr().err


def test_overrides_survive_both_shells():
    job = SlurmJob(nodes=2, gpus_per_node=4, run_dir="/runs/s2")
    inner = shlex.split(node_command(job, "stage2_32k", OVERRIDES))
    app = inner[inner.index("qwen3vl.train.app") + 1:]
    assert parse_app_argv(app) == ("stage2_32k", OVERRIDES)


FAKE_SLURM = {
    "scontrol": """
        if [ "$1 $2" = "show hostnames" ]; then echo node-a; echo node-b; fi
        if [ "$1" = "requeue" ]; then echo "requeue $2" >> "$FAKE_LOG"; fi
    """,
    # srun runs its command once, locally (one node), dropping its own options.
    "srun": """
        while [ "${1#--}" != "$1" ]; do shift; done
        exec "$@"
    """,
    # The step's processes: the fake rank recorded its pid.
    "scancel": """
        echo "scancel $*" >> "$FAKE_LOG"
        kill -USR1 "$(cat "$FAKE_DIR/rank.pid")"
    """,
}
FAKE_RANK = """
    import os, signal, sys, time
    d = os.environ["FAKE_DIR"]
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
    open(os.path.join(d, "argv"), "w").write("\\n".join(sys.argv[1:]))
    open(os.path.join(d, "rank.pid"), "w").write(str(os.getpid()))
    for _ in range(300):
        if stop:
            open(os.path.join(d, "FAKE_LOG"), "a").write("rank saved a checkpoint\\n")
            sys.exit(0)
        time.sleep(0.05)
    sys.exit(5)
"""


@pytest.mark.timeout(60)
def test_preemption_forwards_usr1_then_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    fake_python = bin_dir / "python"  # stands in for torchrun + the ranks
    fake_python.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_RANK))
    fake_python.chmod(0o755)
    job = SlurmJob(nodes=2, gpus_per_node=4, run_dir=str(tmp_path / "run"), python=str(fake_python))
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(job, "stage2_32k", OVERRIDES))
    log = tmp_path / "FAKE_LOG"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_LOG=str(log),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 30
    while not (tmp_path / "rank.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the fake rank install its handler
    proc.send_signal(signal.SIGUSR1)  # Slurm's preemption notice to the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert log.read_text().splitlines() == ["scancel --signal=USR1 4242.0", "rank saved a checkpoint",
                                            "requeue 4242"]
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:9] == ["-m", "qwen3vl.launch.elastic", "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_id", "4242",
                        "--rdzv_backend"]
    assert "node-a:" + str(20000 + 4242 % 20000) in argv
    assert parse_app_argv(argv[argv.index("qwen3vl.train.app") + 1:]) == ("stage2_32k", OVERRIDES)


def test_a_cpu_job_requests_no_gpu_and_runs_nproc_gloo_ranks_per_node(capsys):
    argv = ["--slurm", "--nodes", "2", "--nproc", "3", "--gpus-per-node", "0", "--recipe", "stage0_align",
            "--dry-run", "--", "model=tiny", "data=demo", "parallel.cp=1", "run_dir=/runs/cpu",
            "train.global_batch_tokens=6144"]
    assert launcher.main(argv) == 0  # validated for 2 nodes x 3 ranks
    script = capsys.readouterr().out
    assert not [line for line in script.splitlines() if line.startswith("#SBATCH --gpus")]
    assert "#SBATCH --nodes=2" in script.splitlines()
    assert "--nproc_per_node 3" in script and 'export CUDA_VISIBLE_DEVICES=""' in script
    assert "train.device=cpu" in script  # auto in a job without GPUs
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    argv[-1] = "train.global_batch_tokens=4096"  # 4 rows do not split over 6 ranks: checked for the whole job
    assert launcher.main(argv) == launcher.CONFIG_ERROR_EXIT
    assert "not divisible by dp·train.micro_batch_rows = 6·1" in capsys.readouterr().err


SLURM_MISSING = slurm_cluster.available()


@pytest.mark.skipif(SLURM_MISSING is not None and not slurm_cluster.required(), reason=str(SLURM_MISSING))
@pytest.mark.timeout(900)  # generous for a loaded machine; ~1 minute on a quiet 2-core one
def test_a_preempted_job_is_requeued_and_ends_like_an_uninterrupted_run(tmp_path, demo_dir, s0_reference):
    """A one-node Slurm on localhost runs the tiny S0 as a CPU job; the preemption notice (USR1 to the
    batch shell, as Slurm sends it before a time limit or a preemption) makes the ranks checkpoint and the
    script requeue the job, which resumes and ends with the uninterrupted run's losses, each step once."""
    assert SLURM_MISSING is None, f"QWEN3VL_REQUIRE_SLURM=1, but {SLURM_MISSING}"
    run_dir = tmp_path / "run"
    with slurm_cluster.slurm(tmp_path / "slurm") as env:
        env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")  # one thread per rank, as the reference

        def submit() -> str:
            submitted = subprocess.run(
                [sys.executable, "-m", "qwen3vl.launch.launcher", "--slurm", "--nodes", "1", "--nproc", "2",
                 "--gpus-per-node", "0", "--recipe", "stage0_align", "--", *S0_STAGE, f"run_dir={run_dir}",
                 f"data.demo_dir={demo_dir}"], env=env, capture_output=True, text=True, timeout=120)
            assert submitted.returncode == 0, submitted.stdout + submitted.stderr
            return re.search(r"^Submitted batch job (\d+)$", submitted.stdout, re.M).group(1)

        def job_log() -> str:
            return "".join(p.read_text() for p in (run_dir / "slurm").glob("*.out"))

        def ended(state: dict) -> bool:
            # COMPLETING with a non-zero exit code: it ended, and slurmd is still cleaning up
            return state.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL") or (
                state.get("JobState") == "COMPLETING" and state.get("ExitCode", "0:0") != "0:0")

        def wait(ready, what: str, timeout_s: float = 300.0) -> None:
            deadline = time.monotonic() + timeout_s
            while not ready():
                state = slurm_cluster.job_state(env, job)
                problem = "ended" if ended(state) else "timed out" if time.monotonic() > deadline else None
                assert problem is None, (f"{what}: the job {problem}: {state}\n--- its log:\n{job_log()[-3000:]}\n"
                                         f"{slurm_cluster.daemon_log_errors(env)}")
                time.sleep(0.2)

        job = submit()

        hurried = []

        def completed_after_requeue() -> bool:
            state = slurm_cluster.job_state(env, job)
            if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime" and not hurried:
                # Slurm holds a requeued job for two minutes (its credential lifetime) before it may start
                # again; start it in 3 s instead. Not `now`: slurmd compares the new credential's time with
                # the old one's revocation in whole seconds, and refuses one of the same second.
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, check=True)
                hurried.append(True)
            return state.get("JobState") == "COMPLETED" and state.get("Restarts") == "1"

        wait(lambda: len(read_metrics(run_dir)) >= 2, "the first steps")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        wait(completed_after_requeue, "the requeued job")
    log = job_log()
    assert "preemption notice" in log and log.count("job " + job + ": 1 nodes") == 2, log[-3000:]
    assert "Traceback" not in log and "died unexpectedly" not in log, log[-3000:]  # the step-wide USR1 spared the helpers
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, S0_STEPS + 1))  # each step logged once
    assert trace(records) == s0_reference
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{S0_STEPS:07d}"
