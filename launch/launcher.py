"""``qwen3vl-launch``: run a recipe on torchrun (one node, several nodes) or submit it to Slurm.

    qwen3vl-launch --nproc 2 --recipe stage0_align -- model=tiny data=demo run_dir=DIR train.steps=N
    qwen3vl-launch --nnodes 4 --nproc 8 --rdzv-endpoint head:29500 --recipe stage1_mm -- run_dir=DIR
    qwen3vl-launch --slurm --nodes 8 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --recipe stage2_32k --dry-run -- run_dir=/shared/runs/s2 init_from=/shared/runs/s1

Everything after ``--`` is a Hydra override of the recipe. The config is composed and validated here,
for the whole world size, before any rank starts, so a bad layout, sequence length or missing shard
fails in a second with a message that says what to change (exit code 2). Running the same command
again resumes the run in ``run_dir`` (a larger ``train.steps`` trains on).

Ranks run ``python -m torch.distributed.run ... -m qwen3vl.train.app --config-name RECIPE OVERRIDES``
with ``run_dir`` made absolute; the launcher returns torchrun's exit code.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from qwen3vl.train.config import ConfigError, app_argv, load_config

APP_MODULE = "qwen3vl.train.app"
CONFIG_ERROR_EXIT = 2


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
    s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per Slurm node")
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
    return args.nodes * args.gpus_per_node if args.slurm else args.nproc * args.nnodes


def rank_overrides(overrides: Sequence[str], run_dir: str, demo_dir: str) -> list[str]:
    """The user's overrides with absolute paths, so every rank and node resolves the same directories."""
    kept = [o for o in overrides if not o.startswith(("run_dir=", "data.demo_dir="))]
    return [*kept, f"run_dir={run_dir}", f"data.demo_dir={demo_dir}"]


def torchrun_command(args: argparse.Namespace, overrides: Sequence[str],
                     python: str = sys.executable) -> list[str]:
    """The torchrun command line for one node."""
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
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
    """The environment for the ranks: on CPU, share the cores out (torchrun would force 1 thread each)."""
    env = dict(os.environ)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    return env


def run(cmd: Sequence[str], env: dict[str, str]) -> int:
    """Run torchrun, forwarding SIGTERM to it (it forwards to the ranks, which checkpoint and exit)."""
    child = subprocess.Popen(list(cmd), env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group; let torchrun wind down
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    world_size = world_size_of(args)
    try:
        if args.nproc < 1 or args.nnodes < 1 or args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError(["--nproc, --nnodes, --nodes and --gpus-per-node must be at least 1"])
        cfg = load_config(args.recipe, overrides, world_size=world_size, check_paths=not args.skip_path_checks)
        final = rank_overrides(overrides, cfg.run_dir, cfg.data.demo_dir)
        if args.slurm:
            from qwen3vl.launch.slurm import SlurmJob, sbatch_script, submit

            job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
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
    return run(cmd, rank_environment(args.nproc))


if __name__ == "__main__":
    sys.exit(main())
