"""``qwen3vl-launch``: run a recipe on torchrun (one node, several nodes) or submit it to Slurm.

    qwen3vl-launch --nproc 2 --recipe stage0_align -- model=tiny data=demo run_dir=DIR train.steps=N
    qwen3vl-launch --nnodes 4 --nproc 8 --rdzv-endpoint head:29500 --recipe stage1_mm -- run_dir=DIR
    qwen3vl-launch --slurm --nodes 8 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --recipe stage2_32k --dry-run -- run_dir=/shared/runs/s2 init_from=/shared/runs/s1

Everything after ``--`` is a Hydra override of the recipe. The config is composed and validated here,
for the whole world size, before any rank starts, so a bad layout, sequence length or missing shard
fails in a second with a message that says what to change (exit code 2). Running the same command
again resumes the run in ``run_dir`` (a larger ``train.steps`` trains on).

Ranks run ``python -m qwen3vl.launch.elastic ... -m qwen3vl.train.app --config-name RECIPE OVERRIDES``
(torchrun, see qwen3vl.launch.elastic) with ``run_dir`` made absolute; the launcher returns torchrun's
exit code. When the run fails, the last line says why, from the rank that failed first:
``qwen3vl-launch: rank R failed: <ExceptionType>: <message>``, after one line summarising the ranks
that stopped because of it (their records and tracebacks are in ``<run_dir>/failures/``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from qwen3vl.train.config import ConfigError, app_argv, load_config
from qwen3vl.train.console import filter_known_warnings
from qwen3vl.launch.failure_report import report_failure
from qwen3vl.launch.slurm import SlurmJob, sbatch_script, submit

APP_MODULE = "qwen3vl.train.app"
ELASTIC_MODULE = "qwen3vl.launch.elastic"  # torchrun that records failed ranks instead of printing its frames
CONFIG_ERROR_EXIT = 2
# Set in every rank's environment, so the processes a rank leaves behind (its data workers, Python's
# resource tracker, which warns about a killed rank's semaphores) can be found and awaited.
RUN_MARKER = "QWEN3VL_LAUNCH_ID"
LEFTOVER_WAIT_S = 15.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen3vl-launch", description="Run a Qwen3-VL pretraining recipe on torchrun or Slurm.",
        epilog="Everything after `--` is a Hydra override, e.g. -- model=tiny data=demo run_dir=runs/demo")
    p.add_argument("--recipe", required=True, help="a packaged recipe name (stage0_align, stage1_mm, "
                   "stage2_32k, stage3_256k) or a path to a recipe YAML file")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (torchrun)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, with --master-addr")
    p.add_argument("--master-addr", help="address of node 0 (static multi-node rendezvous)")
    p.add_argument("--master-port", type=int, default=29500, help="port on node 0 (with --master-addr)")
    p.add_argument("--rdzv-endpoint", help="host:port of a c10d rendezvous (elastic multi-node; no node rank)")
    p.add_argument("--rdzv-id", default="qwen3vl", help="rendezvous id shared by the nodes of one job")
    p.add_argument("--dry-run", action="store_true", help="validate and print the command (or the sbatch "
                   "script) without running it")
    p.add_argument("--skip-path-checks", action="store_true", help="do not check that shards and init_from "
                   "exist here (e.g. on a login node that does not mount the data)")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true", help="write an sbatch script and submit it")
    s.add_argument("--nodes", type=int, default=1, help="Slurm nodes")
    s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per Slurm node; 0: a CPU job "
                   "with --nproc gloo ranks per node")
    s.add_argument("--partition", help="Slurm partition")
    s.add_argument("--time", help="Slurm time limit, e.g. 24:00:00")
    s.add_argument("--account", help="Slurm account")
    s.add_argument("--job-name", help="Slurm job name (default qwen3vl-<stage>)")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, Hydra overrides): the overrides are everything after the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def world_size_of(args: argparse.Namespace) -> int:
    if args.slurm:
        return args.nodes * (args.gpus_per_node if args.gpus_per_node > 0 else args.nproc)
    return args.nproc * args.nnodes


def rank_overrides(overrides: Sequence[str], run_dir: str, demo_dir: str) -> list[str]:
    """The user's overrides with absolute paths, so every rank and node resolves the same directories."""
    kept = [o for o in overrides if not o.startswith(("run_dir=", "data.demo_dir="))]
    return [*kept, f"run_dir={run_dir}", f"data.demo_dir={demo_dir}"]


def torchrun_command(args: argparse.Namespace, overrides: Sequence[str],
                     python: str = sys.executable) -> list[str]:
    """The torchrun command line for one node."""
    cmd = [python, "-m", ELASTIC_MODULE, "--nproc_per_node", str(args.nproc)]
    if args.rdzv_endpoint:
        cmd += ["--nnodes", str(args.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", args.rdzv_endpoint,
                "--rdzv_id", args.rdzv_id]
    elif args.master_addr or args.nnodes > 1:
        if not args.master_addr:
            raise ConfigError([f"--nnodes {args.nnodes} needs --master-addr (with --node-rank) or "
                               "--rdzv-endpoint host:port"])
        cmd += ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
                "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    else:
        cmd += ["--standalone"]  # one node: torchrun picks a free port
    return cmd + ["-m", APP_MODULE, *app_argv(args.recipe, overrides)]


def rank_environment(nproc: int, cuda: Optional[bool] = None) -> dict[str, str]:
    """The environment for the ranks: on CPU, share the cores out (torchrun would force 1 thread each) and
    hide any GPU (megatron's CPU backend applies only where none is visible)."""
    env = dict(os.environ)
    if cuda is None:
        import torch  # lazy: the launcher's parent process imports torch only to probe for a GPU

        cuda = torch.cuda.is_available()
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    return env


def rank_device(cfg, slurm_gpus_per_node: Optional[int]) -> str:
    """The ``train.device`` every rank gets. A Slurm job (``slurm_gpus_per_node`` not None) that asks for GPUs
    means cuda by ``auto`` (checked on the nodes), one with ``--gpus-per-node 0`` cpu; on torchrun this
    machine's ``auto`` is resolved now, so a GPU host whose torch cannot use its GPUs fails here, before any
    rank starts, and every rank gets the same answer."""
    requested = getattr(cfg.train.device, "value", cfg.train.device)
    if slurm_gpus_per_node is not None:
        if slurm_gpus_per_node == 0 and requested == "cuda":
            raise ConfigError(["train.device=cuda in a Slurm CPU job (--gpus-per-node 0): ask for GPUs with "
                               "--gpus-per-node G, or leave train.device=auto"])
        if requested != "auto":
            return requested
        return "cuda" if slurm_gpus_per_node > 0 else "cpu"
    from qwen3vl.parallel.groups import resolve_device  # lazy: imports torch, which --help does not need

    try:
        return resolve_device(requested).type
    except RuntimeError as err:
        raise ConfigError([str(err)]) from err


def run(cmd: Sequence[str], env: dict[str, str], run_dir: Optional[str] = None) -> int:
    """Run torchrun, forwarding SIGTERM to it (it forwards to the ranks, which checkpoint and exit).

    With ``run_dir``, a failed run ends with the failure report (``report_failure``) as the last lines.
    """
    started = time.time()
    marker = f"{RUN_MARKER}={os.getpid()}-{started}"
    env = {**env, RUN_MARKER: marker.split("=", 1)[1]}
    child = subprocess.Popen(list(cmd), env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group; let torchrun wind down
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0 and run_dir is not None:
        wait_for_leftovers(marker, LEFTOVER_WAIT_S)  # their last words would come after the report
        report_failure(run_dir, started, code)
    return code


def wait_for_leftovers(marker: str, timeout_s: float) -> None:
    """Waits (up to ``timeout_s``) until no process carries ``marker`` in its environment (Linux /proc;
    elsewhere it returns at once). A killed rank's data workers notice within seconds and exit, and
    then its resource tracker, which prints a warning about the semaphores it cleans up."""
    needle = marker.encode() + b"\0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return
        alive = False
        for pid in pids:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    alive = needle in f.read() + b"\0"
            except OSError:
                continue  # gone meanwhile, or not ours to read
            if alive:
                break
        if not alive:
            return
        time.sleep(0.1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    # Validation reads a run's checkpoint on resume, which imports megatron-core and its import-time notes.
    filter_known_warnings()
    world_size = world_size_of(args)
    try:
        if args.nproc < 1 or args.nnodes < 1 or args.nodes < 1 or args.gpus_per_node < 0:
            raise ConfigError(["--nproc, --nnodes and --nodes must be at least 1, --gpus-per-node at least 0 "
                               "(0: CPU ranks)"])
        if args.slurm and args.gpus_per_node > 0 and args.nproc not in (1, args.gpus_per_node):
            raise ConfigError([f"--nproc {args.nproc} with --slurm --gpus-per-node {args.gpus_per_node}: a GPU job "
                               "runs one rank per GPU; --nproc sets the ranks per node of a CPU job "
                               "(--gpus-per-node 0)"])
        cfg = load_config(args.recipe, overrides, world_size=world_size, check_paths=not args.skip_path_checks)
        device = rank_device(cfg, args.gpus_per_node if args.slurm else None)
        final = [o for o in rank_overrides(overrides, cfg.run_dir, cfg.data.demo_dir)
                 if not o.startswith("train.device=")] + [f"train.device={device}"]
        if args.slurm:
            job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpu_ranks_per_node=args.nproc,
                           partition=args.partition,
                           time=args.time, account=args.account, job_name=args.job_name or f"qwen3vl-{cfg.stage}",
                           run_dir=cfg.run_dir)
            script = sbatch_script(job, args.recipe, final)
            if args.dry_run:
                print(script)
                return 0
            return submit(job, script)
        cmd = torchrun_command(args, final)
    except ConfigError as err:
        print(f"qwen3vl-launch: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    print(f"qwen3vl-launch: {world_size} rank(s), run_dir {cfg.run_dir}\n  {shlex.join(cmd)}", flush=True)
    return run(cmd, rank_environment(args.nproc, cuda=device == "cuda"), cfg.run_dir)


if __name__ == "__main__":
    sys.exit(main())
