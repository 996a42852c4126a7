"""Checkpoint commit protocol, retention, a save killed half-way, and resharding on resume."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen3vl_testing.distributed import run_distributed, support_env
from qwen3vl.train import checkpoint as ckpt
from qwen3vl_testing.training import fixed_rows, tiny_config, train_on_rows


def fake_run(tmp_path: Path, steps: list[int], latest: int | None) -> Path:
    for s in steps:
        d = ckpt.iteration_dir(tmp_path, s)
        d.mkdir(parents=True)
        (d / "metadata.json").write_text("{}")
    if latest is not None:
        ckpt._write_atomic(ckpt.checkpoints_dir(tmp_path) / ckpt.TRACKER, f"iter_{latest:07d}\n")
    return tmp_path


# ---- pure file-level behaviour ------------------------------------------------------------------------

def test_latest_is_what_the_tracker_names_and_later_directories_are_uncommitted(tmp_path):
    run = fake_run(tmp_path, [1, 2, 3], latest=2)
    assert ckpt.find_latest(run) == ckpt.iteration_dir(run, 2)
    assert ckpt.committed_steps(run) == [1, 2]
    assert ckpt.remove_uncommitted(run) == [3]
    assert not ckpt.iteration_dir(run, 3).exists()
    assert [p.name for p in ckpt.checkpoints_dir(run).iterdir() if p.name.startswith(".")] == []  # no temp files


def test_no_tracker_means_no_checkpoint(tmp_path):
    run = fake_run(tmp_path, [1], latest=None)
    assert ckpt.find_latest(run) is None
    assert ckpt.remove_uncommitted(run) == [1]  # a first save that never committed


def test_a_tracker_naming_a_missing_directory_is_an_error(tmp_path):
    run = fake_run(tmp_path, [1], latest=5)
    with pytest.raises(ckpt.CheckpointError, match="iter_0000005"):
        ckpt.find_latest(run)


def test_retention_keeps_the_last_k_and_never_the_latest(tmp_path):
    run = fake_run(tmp_path, [1, 2, 3, 4, 5], latest=4)
    assert ckpt.apply_retention(run, keep_last_k=2) == [1, 2]
    assert ckpt.committed_steps(run) == [3, 4]
    assert ckpt.iteration_dir(run, 5).exists()  # uncommitted: not retention's business
    assert ckpt.apply_retention(run, keep_last_k=1) == [3]
    assert ckpt.find_latest(run) == ckpt.iteration_dir(run, 4)
    with pytest.raises(ckpt.CheckpointError, match="keep at least 1"):
        ckpt.apply_retention(run, keep_last_k=0)


def test_resolve_accepts_a_run_directory_or_one_checkpoint(tmp_path):
    run = fake_run(tmp_path / "run", [1, 2], latest=2)
    assert ckpt.resolve_checkpoint(run) == ckpt.iteration_dir(run, 2)
    assert ckpt.resolve_checkpoint(ckpt.checkpoints_dir(run)) == ckpt.iteration_dir(run, 2)
    assert ckpt.resolve_checkpoint(ckpt.iteration_dir(run, 1)) == ckpt.iteration_dir(run, 1)
    with pytest.raises(ckpt.CheckpointError, match="neither a run directory"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


# ---- a save killed between writing its shards and committing ----------------------------------------

KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
from megatron.core.optimizer import OptimizerConfig
from qwen3vl.parallel.groups import initialize_parallel
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl_testing.tiny_gpt import TinyGPT, build_chunks
from qwen3vl.parallel.zero1 import wrap_for_training
from qwen3vl.train import checkpoint as ckpt
from qwen3vl.train.checkpoint_async import AsyncSaver

def main(run_dir, marker, mode):
    layout = ParallelLayout()
    initialize_parallel(layout)
    chunks, optimizer = wrap_for_training(build_chunks(TinyGPT(), layout), layout,
                                          OptimizerConfig(optimizer="adam", lr=1e-3, bf16=False))
    ckpt.save_checkpoint(run_dir, ckpt.TrainState(step=1), chunks, optimizer, loader_state={"position": 1})
    def hang():  # every shard of step 2 is written; the tracker is not
        Path(marker).write_text("ready")
        time.sleep(600)
    ckpt._before_commit = hang
    saver = AsyncSaver() if mode == "async" else None
    ckpt.save_checkpoint(run_dir, ckpt.TrainState(step=2), chunks, optimizer, loader_state={"position": 2},
                         async_saver=saver)
    if saver is not None:
        saver.wait()  # the background write finishes, then the commit (and the hang) runs

if __name__ == "__main__":
    main(*sys.argv[1:4])
"""


def resume_body(run_dir: str) -> tuple[int, object, str]:
    from megatron.core.optimizer import OptimizerConfig

    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl_testing.tiny_gpt import TinyGPT, build_chunks
    from qwen3vl.parallel.zero1 import wrap_for_training

    layout = ParallelLayout()
    initialize_parallel(layout)
    chunks, optimizer = wrap_for_training(build_chunks(TinyGPT(), layout), layout,
                                          OptimizerConfig(optimizer="adam", lr=1e-3, bf16=False))
    loaded = ckpt.load_checkpoint(run_dir, chunks, optimizer)
    # Saving again replaces the uncommitted leftover of the killed save and commits.
    ckpt.save_checkpoint(run_dir, ckpt.TrainState(step=2), chunks, optimizer, loader_state={"position": 2})
    return loaded.state.step, loaded.loader_state, ckpt.find_latest(run_dir).name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_process_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, mode):
    script, marker, run = tmp_path / "kill_me.py", tmp_path / "ready", tmp_path / "run"
    script.write_text(KILL_SCRIPT)
    env = support_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", OMP_NUM_THREADS="1")
    # Its own process group, killed as a whole, as a node failure or the scheduler kills a job: the
    # save's helper processes die with it instead of outliving the test.
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(marker), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the save never reached its commit point"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (ckpt.iteration_dir(run, 2) / "metadata.json").is_file()  # the data of step 2 was all written...
    assert ckpt.find_latest(run) == ckpt.iteration_dir(run, 1)  # ...but never committed
    step, loader_state, latest = run_distributed(resume_body, world_size=1, timeout=120, run_dir=str(run))[0]
    assert (step, loader_state) == (1, {"position": 1})
    assert latest == "iter_0000002"


# ---- an asynchronous save ----------------------------------------------------------------------------

def async_body(run_dir: str, reference_dir: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import OptimizerConfig

    from qwen3vl.parallel.groups import initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout
    from qwen3vl.parallel.zero1 import wrap_for_training
    from qwen3vl.train.checkpoint_async import AsyncSaver
    from qwen3vl_testing.tiny_gpt import TinyGPT, build_chunks

    layout = ParallelLayout()
    initialize_parallel(layout)
    chunks, optimizer = wrap_for_training(build_chunks(TinyGPT(), layout), layout,
                                          OptimizerConfig(optimizer="adam", lr=1e-3, bf16=False))
    saver = AsyncSaver()
    ckpt.save_checkpoint(run_dir, ckpt.TrainState(step=1), chunks, optimizer, async_saver=saver)
    saver.wait()
    ckpt.save_checkpoint(reference_dir, ckpt.TrainState(step=2), chunks, optimizer)  # the same state, in sync
    ckpt.save_checkpoint(run_dir, ckpt.TrainState(step=2), chunks, optimizer, async_saver=saver)
    before_commit = ckpt.find_latest(run_dir).name
    with torch.no_grad():  # training goes on and changes everything the save captured
        for chunk in chunks:
            for p in chunk.parameters():
                p.add_(1.0)
        for opt in optimizer.chained_optimizers:
            for state in opt.optimizer.state.values():
                state["exp_avg"].add_(1.0)
    in_flight = saver.in_flight
    saver.close()
    a = dist_checkpointing.load_plain_tensors(str(ckpt.find_latest(run_dir)))
    b = dist_checkpointing.load_plain_tensors(str(ckpt.find_latest(reference_dir)))
    tensors = [k for k, v in b.items() if isinstance(v, torch.Tensor)]  # (RNG and loader states are objects)
    return {"before_commit": before_commit, "in_flight": in_flight, "after": ckpt.find_latest(run_dir).name,
            "tensors": len(tensors), "different": sorted(k for k in tensors if not torch.equal(a[k], b[k]))}


def test_an_async_save_commits_once_written_with_the_values_of_its_moment(tmp_path):
    results = run_distributed(async_body, world_size=2, timeout=300, run_dir=str(tmp_path / "run"),
                              reference_dir=str(tmp_path / "reference"))
    for r in results:
        assert r["before_commit"] == "iter_0000001" and r["in_flight"]  # not committed until finalized
        assert r["after"] == "iter_0000002"
        assert r["tensors"] > 10 and r["different"] == []  # the sync save of the same state, bit for bit


# ---- resharding: a TP2 checkpoint resumes under TP1 ---------------------------------------------------

def continue_body(cfg, rows, resume_from=None, save_to=None) -> tuple[list[float], list]:
    run = train_on_rows(cfg, rows, resume_from=resume_from, save_to=save_to)
    return run.losses, run.grad_norms


def test_a_tp2_checkpoint_resumes_under_tp1(demo_dir, tmp_path):
    """TP2 trains 2 steps and saves everything; TP2 and TP1 (DP2) each resume it and train step 3 on the
    same global batch: same loss and gradient norm, so weights, Adam moments and schedule all carried over."""
    tp2 = tiny_config(str(tmp_path / "tp2"), demo_dir, world_size=2, steps=3, overrides=["parallel.tp=2"])
    tp1 = tiny_config(str(tmp_path / "tp1"), demo_dir, world_size=2, steps=3)
    rows = fixed_rows(tp1, 3, 2)
    saved = str(tmp_path / "saved")
    run_distributed(continue_body, world_size=2, timeout=300, cfg=tp2, rows=rows[:2], save_to=saved)
    same = run_distributed(continue_body, world_size=2, timeout=300, cfg=tp2, rows=rows[2:], resume_from=saved)[0]
    resharded = run_distributed(continue_body, world_size=2, timeout=300, cfg=tp1, rows=rows[2:], resume_from=saved)[0]
    assert resharded[0] == pytest.approx(same[0], rel=1e-5)
    assert resharded[1] == pytest.approx(same[1], rel=1e-4)
