"""The generated sbatch script: its #SBATCH lines, the rendezvous, quoting of overrides, and the
preemption protocol (USR1 -> ranks checkpoint and exit 0 -> requeue) run against fake Slurm commands."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qwen3vl.launch import launcher
from qwen3vl.launch.slurm import SlurmJob, node_command, sbatch_script
from qwen3vl.train.config import parse_app_argv

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
    # stage2_32k uses tp2·cp4 = 8 ranks per replica; 1 node of 4 GPUs cannot hold it.
    argv = ["--slurm", "--nodes", "1", "--gpus-per-node", "4", "--recipe", "stage2_32k", "--dry-run",
            "--skip-path-checks"]
    assert launcher.main(argv) == launcher.CONFIG_ERROR_EXIT
    assert "world size 4 is not divisible by tp·pp·cp = 2·1·4" in capsys.readouterr().err


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
    assert argv[:9] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_id", "4242",
                        "--rdzv_backend"]
    assert "node-a:" + str(20000 + 4242 % 20000) in argv
    assert parse_app_argv(argv[argv.index("qwen3vl.train.app") + 1:]) == ("stage2_32k", OVERRIDES)
