"""A real Slurm cluster on this one machine, for tests: one ``slurmctld`` and two ``slurmd`` as two nodes.

Built from Debian's ``slurmctld slurmd slurm-client munge`` packages (Slurm 22.05; Debian's build allows
several ``slurmd`` per host). Everything lives in a temporary directory: a private munge key and socket, the
``slurm.conf`` (``SLURM_CONF`` points the client commands at it), state, spool and logs. The daemons run in
the foreground as children of this process, so they are stopped by their own process ids and reaped (dead
daemons otherwise linger as zombies). The only system file touched is ``/etc/hosts`` (the node names must
resolve for ``MASTER_ADDR``); the line added is removed again on :meth:`SlurmCluster.stop`.

``ensure_slurm()`` installs the packages with apt-get when they are missing and this process is root; it
returns the reason why a cluster cannot run here otherwise, for the tests to skip with.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Debian packages of a working cluster (slurm-client brings sbatch, srun, scontrol, scancel, squeue).
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "munged", "munge", "unmunge")
HOSTS_FILE = Path("/etc/hosts")
#: Job states after which a job (or an array task) runs no more, unless requeued.
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if _which(name) is None]


def ensure_slurm(install: bool = True) -> str | None:
    """Make Slurm and munge available; return None when a cluster can start, else the reason it cannot.

    Installs :data:`APT_PACKAGES` with apt-get when binaries are missing, this process is root and
    ``install`` is true (set ``SLIPFORM_SLURM_NO_INSTALL=1`` to forbid it).
    """
    if os.name != "posix" or not Path("/proc").is_dir():
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (SlurmUser=root, /etc/hosts entries for the node names)"
    missing = missing_binaries()
    if not missing:
        return None
    if not install or os.environ.get("SLIPFORM_SLURM_NO_INSTALL") == "1":
        return f"Slurm binaries missing ({', '.join(missing)}) and installing is disabled"
    apt_get = _which("apt-get")
    if apt_get is None:
        return f"Slurm binaries missing ({', '.join(missing)}) and there is no apt-get to install {APT_PACKAGES}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install_cmd = [apt_get, "install", "-y", "-q", *APT_PACKAGES]
    result = subprocess.run(install_cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a stale package index is the usual cause: refresh it once
        subprocess.run([apt_get, "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install_cmd, env=env, capture_output=True, text=True, timeout=600)
    missing = missing_binaries()
    if result.returncode != 0 or missing:
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        return f"could not install {' '.join(APT_PACKAGES)} with apt-get (rc={result.returncode}): {' | '.join(tail)}"
    return None


def _free_ports(count: int) -> list[int]:
    """Ports free right now (held open together so that they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def parse_scontrol_record(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` (one ``scontrol show -o`` line) to a dict; values never contain ``" X="``."""
    fields: dict[str, str] = {}
    for match in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", line.strip()):
        fields[match.group(1)] = match.group(2)
    return fields


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """One controller and ``nodes`` slurmd daemons (``node1``, ``node2``, ...) on 127.0.0.1.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. :attr:`env` is the environment for
    client commands (``SLURM_CONF`` set); :meth:`run` runs one with it.
    """

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, cluster_name: str = "slipformtest"):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.root = Path(root)
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.cluster_name = cluster_name
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env: dict[str, str] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._hosts_line: str | None = None
        self._started = False

    # ---- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        atexit.register(self.stop)  # a crashed test run still stops the daemons and restores /etc/hosts
        self._started = True
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose directories are not searchable by everyone.
        for path in (self.root, self.root / "munge"):
            path.chmod(0o755)
        self._start_munge()
        ports = _free_ports(1 + len(self.node_names))
        self._write_conf(ctld_port=ports[0], node_ports=ports[1:])
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_NODELIST", "SLURM_JOB_NODELIST"):
            self.env.pop(name, None)  # tests run inside a Slurm job elsewhere: never talk to that cluster
        self._add_hosts_entry()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.node_names:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait_nodes_idle(timeout)

    def stop(self) -> None:
        """Cancel every job, stop the daemons by pid, remove the /etc/hosts line. Safe to call twice."""
        if not self._started:
            return
        self._started = False
        if "slurmctld" in self._processes and self._processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        # Nodes first (they would otherwise keep retrying the controller), munged last.
        for name in [*(n for n in self._processes if n.startswith("slurmd")), "slurmctld", "munged"]:
            process = self._processes.pop(name, None)
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        self._remove_hosts_entry()
        atexit.unregister(self.stop)

    # ---- pieces of start ----------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str | None]) -> None:
        if None in argv:
            raise SlurmError(f"cannot start {name}: binary not found ({argv[0]})")
        log = open(self.log_dir / f"{name}.stdio", "ab")  # noqa: SIM115 (lives as long as the daemon)
        self._processes[name] = subprocess.Popen(
            argv, env=self.env or None, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        # A credential round trip is the only trustworthy liveness check (a dead munged may linger as a zombie).
        deadline = time.monotonic() + 15
        while True:
            cred = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, text=True)
            if cred.returncode == 0:
                check = subprocess.run(
                    ["unmunge", "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True, text=True
                )
                if check.returncode == 0:
                    return
            if time.monotonic() > deadline or self._processes["munged"].poll() is not None:
                log_file = munge_dir / "munged.log"
                log = log_file.read_text(errors="replace") if log_file.exists() else ""
                raise SlurmError(f"munged did not come up: {cred.stderr.strip()} {log[-500:]}")
            time.sleep(0.2)

    def _write_conf(self, ctld_port: int, node_ports: Iterable[int]) -> None:
        root = self.root
        lines = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # No accounting database: finished jobs stay visible to scontrol (MinJobAge) and are appended here.
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.log_dir / 'jobcomp.txt'}",
            "MinJobAge=3600",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "KillWait=10",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
        ]
        for node, port in zip(self.node_names, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _add_hosts_entry(self) -> None:
        unresolved = []
        for node in self.node_names:
            try:
                socket.gethostbyname(node)
            except OSError:
                unresolved.append(node)
        if not unresolved:
            return
        line = f"127.0.0.1 {' '.join(unresolved)}  # slipform test cluster {os.getpid()}"
        text = HOSTS_FILE.read_text()
        HOSTS_FILE.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
        self._hosts_line = line

    def _remove_hosts_entry(self) -> None:
        if self._hosts_line is None:
            return
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        HOSTS_FILE.write_text("".join(line for line in lines if line.rstrip("\n") != self._hosts_line))
        self._hosts_line = None

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} exited with {process.returncode}; see {self.log_dir}")
            out = subprocess.run(
                ["scontrol", "show", "node", "-o"], env=self.env, capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0:
                records = [parse_scontrol_record(line) for line in out.stdout.splitlines() if line.strip()]
                states = {r.get("NodeName", "?"): r.get("State", "?") for r in records}
                if len(states) == len(self.node_names) and all(s.startswith("IDLE") for s in states.values()):
                    return
            time.sleep(0.5)
        raise SlurmError(f"nodes not idle after {timeout:.0f} s: {states}; see {self.log_dir}")

    # ---- client side ----------------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, env: Mapping[str, str] | None = None, cwd: Path | None = None):
        """Run a Slurm client command against this cluster; returns the CompletedProcess (text)."""
        result = subprocess.run(
            list(argv), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *argv: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job; returns its id (for an array, the array's job id)."""
        out = self.run("sbatch", "--parsable", *argv, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o`` records of a job (one per array task for an array job)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if out.returncode != 0:
            return []
        return [parse_scontrol_record(line) for line in out.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        records = self.jobs(job_id)
        if len(records) != 1:
            raise SlurmError(f"expected one record for job {job_id}, got {len(records)}")
        return records[0]

    def wait(
        self,
        job_id: str,
        until: Iterable[str] = FINISHED_STATES,
        timeout: float = 300.0,
        poll: float = 0.5,
    ) -> list[dict[str, str]]:
        """Poll until every record of ``job_id`` is in one of the states ``until``; returns the records."""
        wanted = frozenset(until)
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in wanted for r in records):
                return records
            time.sleep(poll)
        states = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in records]
        raise SlurmError(f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s: {states}")

    def slurmd_log(self, node: str) -> str:
        path = self.log_dir / f"slurmd-{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""
