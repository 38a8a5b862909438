"""A Slurm cluster of one or more nodes on localhost for the tests (Debian's Slurm 22.05).

Several nodes run on one machine as several `slurmd -N NAME` daemons (Debian builds Slurm with
MULTIPLE_SLURMD), each with its own port, spool, pid and log file; every node has NodeAddr=127.0.0.1
and NodeHostname=localhost. Node names (n1, n2, ...) do not resolve, as on clusters whose node
names are not in DNS: jobs must use the address Slurm knows for a node.

Everything lives in one private directory: the munge key, socket and seed, slurm.conf, the state
and spool directories, pid and log files. The daemons listen on free ports, so two clusters (two
test sessions) on one machine do not collide. Every Slurm command must see `SLURM_CONF`: use the
`env` dict of a started cluster. Daemons are stopped by their pids, never by name.

    cluster = SlurmCluster(tmp_dir, nodes=2); cluster.start(); ...; cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from aipo_mp.runtime import spawn

PACKAGES = ("slurmctld", "slurmd", "munge", "slurm-client")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel", "squeue")


class SlurmUnavailable(RuntimeError):
    """Slurm is missing and cannot be installed here (no apt, or not root)."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(timeout: int = 600) -> None:
    """Install Debian's Slurm and munge with apt-get when any binary is missing."""
    if not missing_binaries():
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing_binaries())} missing) and apt-get is "
                               f"unavailable: install {' '.join(PACKAGES)} to run the Slurm tests")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed and installing it needs root: "
                               f"sudo apt-get install -y {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:  # stale package lists: update once and retry
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or missing_binaries():
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed (exit {r.returncode}):\n"
                           f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


SLURM_CONF = """\
# Written by tests/slurm_cluster.py: {num_nodes} node(s) on localhost.
ClusterName=aipotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
# Fast turnaround for tests: short kill wait, frequent scheduling.
MinJobAge=300
KillWait=10
SchedulerParameters=sched_interval=1
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
NODE_LINE = ("NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} CPUs={cpus} "
             "RealMemory={memory_mb} State=UNKNOWN")


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 4000, cred_expire: int = 10, nodes: int = 1):
        self.root = Path(root)
        # One node: "localhost" (resolves); several: n1, n2, ... ("localhost" cannot be one of
        # several names: slurmctld rejects a duplicated NodeHostname for it).
        self.node_names = ["localhost"] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.cred_expire = cred_expire
        self.pids: dict[str, int] = {}
        self.env: dict[str, str] = {}

    # -- set-up -------------------------------------------------------------------------------
    def write_files(self) -> Path:
        r = self.root
        for d in ("state", "spool", "munge", "logs"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o600)
        ctld_port, *node_ports = spawn.free_ports(1 + len(self.node_names))
        node_lines = "\n".join(NODE_LINE.format(name=name, port=port, cpus=self.cpus, memory_mb=self.memory_mb)
                               for name, port in zip(self.node_names, node_ports))
        if self.node_names == ["localhost"]:
            node_lines = node_lines.replace(" NodeHostname=localhost", "")
        for name in self.node_names:
            (r / "spool" / name).mkdir(parents=True, exist_ok=True)
        conf = r / "slurm.conf"
        conf.write_text(SLURM_CONF.format(root=r, ctld_port=ctld_port, munge_socket=r / "munge" / "munge.socket",
                                          cred_expire=self.cred_expire, num_nodes=len(self.node_names),
                                          node_lines=node_lines, node_names=",".join(self.node_names)))
        self.env = {
            "SLURM_CONF": str(conf),
            # What munge clients (and slurm's auth plugin via AuthInfo) use.
            "MUNGE_SOCKET": str(r / "munge" / "munge.socket"),
        }
        return conf

    def command_env(self) -> dict:
        """os.environ + this cluster, without the variables of any allocation we may be inside."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        return env

    def start(self, timeout: float = 60.0) -> dict:
        ensure_installed()
        self.write_files()
        r = self.root
        munge_dir = r / "munge"
        subprocess.run([sbin("munged"), "--force", f"--socket={munge_dir / 'munge.socket'}",
                        f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
                        f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"],
                       check=True, capture_output=True, text=True, timeout=30)
        self.pids["munged"] = self._wait_pid(munge_dir / "munged.pid")
        env = self.command_env()
        # -i: ignore saved state of an earlier run in this directory; daemonize, then find the pid.
        subprocess.run([sbin("slurmctld"), "-i"], check=True, env=env, capture_output=True, text=True, timeout=30)
        self.pids["slurmctld"] = self._wait_pid(r / "slurmctld.pid")
        # The machine's host name is not a node name: name each node explicitly.
        for name in self.node_names:
            subprocess.run([sbin("slurmd"), "-N", name], check=True, env=env, capture_output=True, text=True,
                           timeout=30)
            self.pids[f"slurmd-{name}"] = self._wait_pid(r / f"slurmd-{name}.pid")
        self.wait_idle(timeout)
        return dict(self.env)

    def _wait_pid(self, pid_file: Path, timeout: float = 20.0) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, 0)
                return pid
            except (FileNotFoundError, ValueError, ProcessLookupError):
                time.sleep(0.1)
        raise RuntimeError(f"daemon did not write {pid_file}; logs:\n{self.logs()}")

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.command_env(), capture_output=True,
                               text=True)
            state = r.stdout.strip()
            if state.split() == ["idle"] * len(self.node_names):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout}s (sinfo: {state!r}); logs:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("slurmctld.log", *[f"slurmd-{n}.log" for n in self.node_names], "munge/munged.log"):
            p = self.root / name
            if p.exists():
                out.append(f"--- {name} ---\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- use ----------------------------------------------------------------------------------
    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        env = self.command_env()
        env.update(kw.pop("env", None) or {})
        return subprocess.run(argv, env=env, **kw)

    def job_state(self, job_id: str) -> str:
        r = self.run(["squeue", "-h", "-j", job_id, "-o", "%T"])
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
        r = self.run(["scontrol", "show", "job", job_id])
        for field in r.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def show_job(self, job_id: str, tries: int = 5) -> dict:
        """`scontrol show job` fields; retried, since a busy slurmctld sometimes answers nothing."""
        for _ in range(tries):
            r = self.run(["scontrol", "-o", "show", "job", job_id])
            if r.returncode == 0 and "JobState=" in r.stdout:
                break
            time.sleep(0.5)
        fields = {}
        for item in r.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields[k] = v
        return fields

    # -- tear-down ----------------------------------------------------------------------------
    def stop(self, timeout: float = 15.0) -> None:
        """Cancel leftover jobs, then stop slurmd, slurmctld and munged by pid."""
        if "slurmctld" in self.pids:
            self.run(["scancel", "--full", "--signal=KILL", "--state=RUNNING", "--user=root"], timeout=10)
            self.run(["scancel", "--user=root"], timeout=10)
        for name in (*[f"slurmd-{n}" for n in self.node_names], "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _terminate(pid, timeout)


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_cluster(root: Path, cpus: Optional[int] = None, nodes: int = 1) -> SlurmCluster:
    cluster = SlurmCluster(root, cpus=cpus or 2, nodes=nodes)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


# -- a tiny distributed task for launcher tests: `python -m tests.slurm_cluster allreduce OUT_DIR [SECONDS]` --
def _allreduce_main(out_dir: str, seconds: float = 0.0) -> int:
    """Join the gloo group the launcher describes, all-reduce the ranks, write OUT_DIR/rank_R.json.
    With SECONDS > 0, wait that long for SIGUSR1/SIGTERM first and record it (agreed by all ranks)."""
    import json

    got = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # before the slow imports
        signal.signal(sig, lambda s, _f: got.append(signal.Signals(s).name))
    import torch

    from aipo_mp.runtime.platform import init_distributed, read_dist_env

    env = init_distributed(timeout_minutes=2)
    if env.rank == 0:
        print(f"ready: {env.world_size} ranks", flush=True)
    deadline = time.time() + seconds
    while time.time() < deadline and not got:
        time.sleep(0.05)
    t = torch.tensor([float(env.rank)])
    torch.distributed.all_reduce(t)
    record = {"rank": env.rank, "world_size": env.world_size, "sum": float(t.item()), "launcher": env.launcher,
              "master": f"{env.master_addr}:{env.master_port}", "signals": got,
              "node": os.environ.get("SLURMD_NODENAME"), "setup_mark": os.environ.get("AIPO_SETUP_MARK"),
              "dist_env": read_dist_env().__dict__}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank_{env.rank}.json").write_text(json.dumps(record))
    if got and env.rank == 0:
        print("stopped by signal (allreduce task)", flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["exit"]:  # exit CODE [SECONDS]: sleep, then exit with CODE
        time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
        sys.exit(int(sys.argv[2]))
    if sys.argv[1:2] == ["rank-exit"]:  # rank-exit CODE SECONDS: the last rank exits CODE after 1 s, others sleep
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        time.sleep(1.0 if rank == world - 1 else float(sys.argv[3]))
        sys.exit(int(sys.argv[2]) if rank == world - 1 else 0)
    if sys.argv[1:2] == ["allreduce"]:
        sys.exit(_allreduce_main(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
    sys.exit("usage: python -m tests.slurm_cluster allreduce OUT_DIR [SECONDS] | exit CODE [SECONDS] | rank-exit CODE SECONDS")
