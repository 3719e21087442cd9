"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd with their own
key, socket, ports, state and logs in a temporary folder, stopped by PID at the end.

    with one_node_cluster(folder) as cluster:   # cluster.env: SLURM_CONF (and PATH) for sbatch, squeue, ...
        subprocess.run(["sbatch", ...], env=cluster.env)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
TOOLS = ("sbatch", "squeue", "scancel", "scontrol")


def missing_programs() -> list[str]:
    """The SLURM and munge programs that are not installed here."""
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [name for name in (*DAEMONS, *TOOLS) if shutil.which(name, path=paths) is None]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _program(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


@dataclass
class Cluster:
    folder: Path
    env: dict
    pids: dict = field(default_factory=dict)

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)


def _write_config(folder: Path, munge_socket: Path, ports: list[int]) -> Path:
    host, user = socket.gethostname(), os.environ.get("USER") or "root"
    cpus = os.cpu_count() or 1
    for name in ("state", "spool", "log"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=tests", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}", f"SlurmUser={user}", f"SlurmdUser={user}", "AuthType=auth/munge",
        f"AuthInfo=socket={munge_socket}", "CredType=cred/munge",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill", "ReturnToService=2",
        "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=30", "MinJobAge=600",
        "MessageTimeout=5", "SchedulerParameters=sched_interval=1", "SlurmctldDebug=info", "SlurmdDebug=info",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4", ""]))
    return conf


def _start_munge(folder: Path) -> tuple[subprocess.Popen, Path]:
    munge = folder / "munge"
    munge.mkdir(mode=0o700, exist_ok=True)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = munge / "munge.socket"
    process = subprocess.Popen([_program("munged"), "--foreground", "--force", f"--key-file={key}",
                                f"--socket={sock}", f"--pid-file={munge / 'munged.pid'}",
                                f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, sock


def _wait(check, timeout: float, what: str, folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    logs = "\n".join(p.read_text()[-1500:] for p in (folder / "log").glob("*.log"))
    raise RuntimeError(f"the test cluster did not come up: {what}\n{logs}")


@contextlib.contextmanager
def one_node_cluster(folder: Path):
    """Start munged, slurmctld and slurmd; yield the Cluster; stop them by PID, even on failure."""
    folder.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        munged, munge_socket = _start_munge(folder)
        processes.append(munged)
        _wait(munge_socket.exists, 10, "munged's socket", folder)
        conf = _write_config(folder, munge_socket, _free_ports(2))
        env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
        for name in ("slurmctld", "slurmd"):
            processes.append(subprocess.Popen([_program(name), "-D", "-f", str(conf)], env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        cluster = Cluster(folder, env, {p.args[0]: p.pid for p in processes})

        def idle() -> bool:
            result = cluster.run("sinfo", "-h", "-o", "%t", check=False, timeout=10)
            return result.returncode == 0 and result.stdout.strip() in ("idle", "mix", "alloc")
        _wait(idle, 60, "no idle node", folder)
        yield cluster
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
