"""A one-node Slurm on localhost for tests: its own munged, slurmctld and slurmd, all files in one folder.

    with slurm(tmp_path) as env:        # env: os.environ + SLURM_CONF for sbatch, squeue, scancel ...
        subprocess.run(["sbatch", script], env=env)

``slurm`` starts a fresh cluster for the block where it can (root and the daemons installed), so a test
sees no state of earlier tests and its daemons' logs are its own (``daemon_log_errors`` for a failure
message); elsewhere it uses the cluster that ``$SLURM_CONF`` names when that answers.
``python tests/support/qwen3vl_testing/slurm_cluster.py DIR`` runs one until SIGTERM, for trying things
by hand. Debian's ``slurm-wlm`` and ``munge`` packages provide the daemons (``.ci/run`` installs them). The
cluster uses its own munge socket, ports, state and spool directories, so it neither needs nor
disturbs a Slurm that may already run on the machine; the daemons run as root (slurmd must, to
start jobs) and are stopped on exit. ``available()`` says why no cluster can be used here; with
``QWEN3VL_REQUIRE_SLURM=1`` (set by CI once the packages are installed) a test must not skip for that.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel")


def available() -> Optional[str]:
    """None when a local cluster can start here or $SLURM_CONF's answers, else the reason not."""
    why_not = _why_no_local()
    if why_not is None or _running(dict(os.environ)):
        return None
    return why_not


def _why_no_local() -> Optional[str]:
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
               and not Path("/usr/sbin", name).is_file()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts the jobs)"
    if not Path("/etc/munge/munge.key").is_file():
        return "no munge key at /etc/munge/munge.key (the munge package creates it)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, host: str, cpus: int, memory_mb: int) -> str:
    return "\n".join([
        "ClusterName=qwen3vl-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        # linuxproc tracks a step's processes by parentage: no cgroups needed (containers, CI)
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "JobRequeue=1",
        "MinJobAge=600",  # finished jobs stay visible to scontrol for the test
        "KillWait=10",
        # A 2-core machine busy with multi-rank tests can starve slurmd for a while; a node marked not
        # responding would fail the test's job for a reason that is not the test's.
        "SlurmctldTimeout=300",
        "SlurmdTimeout=300",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def required() -> bool:
    """CI sets QWEN3VL_REQUIRE_SLURM=1 after starting its cluster: there a missing Slurm is a failure."""
    return os.environ.get("QWEN3VL_REQUIRE_SLURM") == "1"


def _running(env: dict[str, str]) -> bool:
    """Whether the cluster that ``env``'s SLURM_CONF names answers."""
    if not env.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def slurm(root: Path) -> Iterator[dict[str, str]]:
    """A fresh local cluster under ``root`` for the block where one can start, else $SLURM_CONF's."""
    if _why_no_local() is not None and _running(dict(os.environ)):
        yield dict(os.environ)
        return
    with local_slurm(root) as env:
        yield env


@contextlib.contextmanager
def local_slurm(root: Path, timeout_s: float = 60.0) -> Iterator[dict[str, str]]:
    """Start the cluster under ``root``; yields the environment for Slurm's client commands."""
    root = Path(root)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20 * 0.9)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, host, cpus, memory_mb))
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(_start([_binary("munged"), "--foreground", "--force", f"--socket={root / 'munge.socket'}",
                               f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                               f"--seed-file={root / 'munged.seed'}"], root / "munged.out"))
        _wait_for(lambda: (root / "munge.socket").exists(), timeout_s, "munged", root / "munged.log")
        daemons.append(_start([_binary("slurmctld"), "-D", "-i", "-f", str(conf)], root / "slurmctld.out", env))
        daemons.append(_start([_binary("slurmd"), "-D", "-N", host, "-f", str(conf)], root / "slurmd.out", env))
        _wait_for(lambda: _node_idle(env, host), timeout_s, "slurmd (node idle)", root / "slurmd.log")
        yield env
    finally:
        for proc in reversed(daemons):
            proc.terminate()
        for proc in reversed(daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(cmd: list[str], out: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(out, "w"), stderr=subprocess.STDOUT, env=env)


def _node_idle(env: dict[str, str], host: str) -> bool:
    done = subprocess.run(["sinfo", "-h", "-n", host, "-o", "%t"], env=env, capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() in ("idle", "mix", "alloc")


def _wait_for(ready, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log.is_file() else "(no log)"
            raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s; log tail:\n{tail}")
        time.sleep(0.2)


def job_state(env: dict[str, str], job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    fields = {}
    for item in done.stdout.split():
        key, _, value = item.partition("=")
        fields[key] = value
    return fields


# Errors every fresh cluster logs once at start (no state files yet, no PMIx, no mail program).
STARTUP_NOISE = ("pmix", "mpi:", "state file", "note: trying backup", "mailprog")


def daemon_log_errors(env: dict[str, str], lines: int = 40) -> str:
    """The last ``lines`` error and kill lines of the cluster's slurmctld and slurmd logs (the files its
    slurm.conf names), for a failure message: why Slurm ended a job that never ran its script."""
    conf = Path(env.get("SLURM_CONF", ""))
    if not conf.is_file():
        return "(no slurm.conf to find the daemons' logs)"
    files = dict(line.split("=", 1) for line in conf.read_text().splitlines() if "LogFile=" in line)
    out = []
    for key in ("SlurmctldLogFile", "SlurmdLogFile"):
        log = Path(files.get(key, ""))
        if not log.is_file():
            continue
        hits = [line for line in log.read_text(errors="replace").splitlines()
                if any(w in line.lower() for w in ("error", "kill", "revoked", "fail", "requeue", "launch"))
                and not any(w in line.lower() for w in STARTUP_NOISE)]
        out.append(f"--- {log}\n" + "\n".join(hits[-lines:]))
    return "\n".join(out) or "(no daemon logs found)"


def main(argv: list[str]) -> int:
    """``slurm_cluster.py DIR``: runs a cluster under DIR until SIGTERM; DIR/slurm.conf once it is up."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds local_slurm, which stops the daemons
    with local_slurm(Path(argv[0])):
        print(f"slurm_cluster: up, SLURM_CONF={Path(argv[0]) / 'slurm.conf'}", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
