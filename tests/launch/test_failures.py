"""A failed run ends with one line from the rank that failed first, on every path users take.

Through ``qwen3vl-launch`` on 2 CPU ranks, with a copy of the demo corpus in which three shards are
truncated and the only text shard is garbage (the original moved away: the copy must be what is
read): by default the run stops, every rank with the dataset's message, and the launcher's last line
names the dataset and the cause; with ``data.on_empty_dataset=drop`` it trains on the copy, and a rank
killed by SIGKILL mid-step makes the others exit, the last line naming the dead rank. Nothing is left
running. The Slurm script and ``qwen3vl-convert`` end their failures the same way.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qwen3vl.data.demo import write_demo
from qwen3vl.launch.slurm import SlurmJob, sbatch_script
from qwen3vl.train.failure_record import failures_dir, read_records
from qwen3vl.train.metrics import read_metrics

EXIT_WITHIN_S = 60  # after the first failure, everything is gone within this


@pytest.fixture(scope="module")
def corrupted_copy(tmp_path_factory) -> Path:
    """A copy of a small demo corpus: 3 shards cut in the middle, the only text shard garbage, the
    original moved away."""
    root = tmp_path_factory.mktemp("corpus")
    # Every readable dataset holds at least one sample for each of the 4 consumers (2 ranks x 2 loader workers).
    write_demo(root / "original", captions=24, videos=8, interleaved=16, texts=8, samples_per_shard=8)
    shutil.copytree(root / "original", root / "copy")
    shutil.move(root / "original", root / "moved")
    for shard in ("caption/caption-000000.tar", "caption/caption-000002.tar", "interleaved/interleaved-000000.tar"):
        path = root / "copy" / shard
        os.truncate(path, path.stat().st_size // 3)
    (root / "copy" / "text" / "text-000000.tar").write_bytes(os.urandom(20_000))
    return root / "copy"


def launch(run_dir: Path, corpus: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen3vl.launch.launcher", "--nproc", "2", "--recipe", "stage0_align", "--",
           "model=tiny", "data=demo", f"run_dir={run_dir}", f"data.demo_dir={corpus}", "wandb.mode=disabled",
           "train.seq_length=512", "train.global_batch_tokens=1024", "parallel.cp=1", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_processes(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the training processes of this run still alive (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if "qwen3vl.train.app" not in argv or f"run_dir={run_dir}" not in argv or "qwen3vl.launch.elastic" in argv:
                continue
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                       if "=" in kv)
            found[int(env["RANK"])] = int(pid)
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile, or not a rank
    return found


def anything_left(run_dir: Path) -> list[str]:
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"run_dir={run_dir}" in Path(f"/proc/{pid}/cmdline").read_bytes().decode():
                left.append(pid)
        except OSError:
            continue
    return left


def test_an_unreadable_dataset_stops_every_rank_and_the_last_line_names_it(corrupted_copy, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, corrupted_copy, "train.steps=20")
    out, _ = proc.communicate(timeout=600)
    ended = time.time()
    assert proc.returncode != 0, out[-3000:]
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("qwen3vl-launch: rank ") and " failed: EmptyDatasetError: dataset 'text' (shards " \
        f"{corrupted_copy}/text/text-{{000000..000000}}.tar): no readable sample in epoch 0 — 1 shard skipped " \
        f"as truncated_tar (first: {corrupted_copy}/text/text-000000.tar: " in last, last
    records = read_records(failures_dir(run_dir))
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert len({(r["type"], r["message"]) for r in records}) == 1  # every rank stopped with the same message
    for rank in (0, 1):  # ... and said so
        assert any(line.startswith(f"[qwen3vl-train] rank {rank} ") and "dataset 'text'" in line
                   for line in out.splitlines()), out[-3000:]
    assert "ChildFailedError" not in out and "Traceback" not in out  # a data problem needs no stack frames
    assert ended - min(r["time"] for r in records) < EXIT_WITHIN_S
    assert not anything_left(run_dir)


def test_drop_trains_on_the_copy_and_a_killed_rank_is_named(corrupted_copy, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, corrupted_copy, "schedule.total_steps=1000", "train.steps=1000",  # a long stage
                  "data.on_empty_dataset=drop")
    lines, dropped = [], False
    for line in proc.stdout:
        lines.append(line)
        dropped = dropped or "leaves the mixture" in line
        if dropped and " step " in line and "/1000 (" in line:  # a step logged after the drop: inside the next
            pids = rank_processes(run_dir)
            os.kill(pids[1], signal.SIGKILL)
            killed = time.time()
            break
    else:
        pytest.fail("the run ended before it dropped the text dataset:\n" + "".join(lines)[-3000:])
    out = "".join(lines) + proc.communicate(timeout=EXIT_WITHIN_S + 30)[0]
    assert proc.returncode != 0 and time.time() - killed < EXIT_WITHIN_S
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("qwen3vl-launch: rank 1 failed: SIGKILL: killed by SIGKILL"), out[-3000:]
    assert "ChildFailedError" not in out
    assert not anything_left(run_dir)
    # It trained on the copy (the original is gone), without the text dataset, said once and counted.
    first = read_metrics(run_dir)[0]  # the first step line (the held-out evaluation's event comes before it)
    assert {d["name"]: d["shards"] for d in first["datasets"]}["text"] == f"{corrupted_copy}/text/text-{{000000..000000}}.tar"
    assert all(d["shards"].startswith(str(corrupted_copy)) for d in first["datasets"])
    assert sum("leaves the mixture" in line for line in out.splitlines()) == 1
    last_metrics = read_metrics(run_dir)[-1]
    assert last_metrics["skipped"]["empty_dataset"] == 1 and last_metrics["skipped"]["truncated_tar"] >= 1


FAKE_SRUN = """#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""
# Stands in for torchrun and its ranks: rank 3 records a failure and the step exits 1; the failure
# report itself runs in the real interpreter.
FAKE_PYTHON = f"""#!{sys.executable}
import os, sys
if sys.argv[1:3] == ["-m", "qwen3vl.launch.failure_report"]:
    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
import time
from qwen3vl.train.failure_record import write_record
run_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir=")][0]
write_record(os.path.join(run_dir, "failures"), {{"rank": 3, "time": time.time(), "type": "MemoryError",
             "message": "out of host memory while packing", "collateral": False, "origin_rank": None}})
sys.exit(1)
"""


def test_a_failed_slurm_job_ends_with_the_same_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("python", FAKE_PYTHON),
                       ("scontrol", "#!/bin/bash\n[ \"$1\" = show ] && echo node-a\n")):
        (bin_dir / name).write_text(textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    job = SlurmJob(nodes=1, gpus_per_node=4, run_dir=str(run_dir), python=str(bin_dir / "python"))
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(job, "stage1_mm", [f"run_dir={run_dir}"]))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node-a",
               SLURM_NNODES="1")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.rstrip().splitlines()[-1] == \
        "qwen3vl-launch: rank 3 failed: MemoryError: out of host memory while packing", done.stdout + done.stderr


def test_convert_ends_a_failure_with_one_line(tmp_path, capsys):
    from qwen3vl.launch import convert

    with pytest.raises(SystemExit) as stop:
        convert.main(["mcore-to-hf", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")])
    assert stop.value.code == 2
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert last.startswith(f"qwen3vl-convert mcore-to-hf: error: {tmp_path / 'nowhere'} is neither"), last
