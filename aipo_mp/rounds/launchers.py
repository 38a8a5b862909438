"""How `aipo-mp run` starts each stage: local subprocesses, or `srun` job steps inside a Slurm
allocation. A stage is an aipo_mp command without the interpreter, e.g.
["aipo_mp.cli", "train", cfg, "parallel.tp=2"] meaning `python -m aipo_mp.cli train ...`, and a
`Placement` (aipo_mp/rounds/placement.py: tasks, nodes, tasks per node, GPUs per task).

Logs. With a `log_path` (RUN_DIR/logs/STAGE.log) the launcher's own lines and srun's messages go
there, and every task writes its stdout and stderr to RUN_DIR/logs/STAGE/rank<K>.log (srun
`--output` with `%t`); nothing of the stage reaches our console (the caller prints one line).

Interpreter and containers. A stage runs `$AIPO_PYTHON -m argv...` (default: this interpreter;
e.g. AIPO_PYTHON=python3 inside a container image, or a wrapper such as "apptainer exec --nv
img.sif python"), after sourcing `$AIPO_SETUP` (module load / venv activation) in every task
when that is set; AIPO_SRUN_ARGS adds srun flags to every step (pyxis: --container-image=...).

Engine stages (a Placement with `engines` > 0) also get the environment a task reads with
`engine_task()` (aipo_mp/rounds/engines.py): AIPO_ENGINE_NODES (nodes per engine),
AIPO_ENGINE_HOSTS (the address of every task's node, in task order) and AIPO_ENGINE_PORT (a base
port free for the stage; engine e uses the 100 ports from base + 100 e). An engine wider than a
node runs as `nodes_per_engine` tasks, one per node, in the same step; its headless tasks end
when its head task ends (engines.py's beacon), so no engine outlives its stage.

Stopping (preemption, time limit). A launcher handles SIGTERM and SIGUSR1 from its creation on:
it forwards the signal to the running stage (which saves and exits) and remembers it, and once a
stop was requested no further stage starts. `StageResult.stopped_by_signal` is true when the stage
was stopped: it printed the trainer's "stopped by signal" marker, exited with EXIT_STOPPED, or
failed after a stop was requested. A stage that exited 0 is done, even when a signal arrived as it
finished. The caller must not record a stopped stage as done and should exit with EXIT_STOPPED
(75), which tells slurm/common.sh to requeue the job.

    launcher = make_launcher("slurm")            # or "local"
    result = launcher.run("round0-train", ["aipo_mp.cli", "train", cfg], Placement(8, 1, 8, 1), log_path=log)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Protocol

from aipo_mp.errors import EXIT_STOPPED, EXIT_TIMED_OUT, STOP_MARKER, ConfigError
from aipo_mp.rounds.placement import Placement
from aipo_mp.runtime import spawn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
KILL_GRACE_S = 10.0  # after one rank failed: SIGTERM to the others, SIGKILL this much later
TIME_LIMIT_TEXT = (b"DUE TO TIME LIMIT", b"ran past its wall-clock limit")


@dataclass
class StageResult:
    returncode: int  # the stage's exit code (several ranks: the first failure, else 0)
    stopped_by_signal: bool  # stopped (saved, or not started): rerun the stage after a requeue
    timed_out: bool = False  # ended by its wall-clock limit (cluster.stage_minutes)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.stopped_by_signal


class Launcher(Protocol):
    stop_requested: bool

    def run(self, name: str, argv: list[str], placement: Optional[Placement] = None, env: Optional[dict] = None,
            log_path: Optional[Path] = None, time_limit_min: Optional[float] = None) -> StageResult: ...


ENGINE_PORT_RANGE = range(20000, 32000)  # local engine ports: above spawn's rendezvous ports, below the ephemeral range
ENGINE_PORTS = 100  # = aipo_mp.rounds.engines.PORTS_PER_ENGINE (engines.py imports vLLM helpers; this module stays light)


def engine_env(placement: Placement, hosts: list[str], base_port: int) -> dict[str, str]:
    """The engine environment of a placed engine stage (empty for other stages): `hosts` are the
    addresses of the step's tasks in task order."""
    if not getattr(placement, "engines", 0):
        return {}
    return {"AIPO_ENGINE_NODES": str(max(1, getattr(placement, "nodes_per_engine", 1))),
            "AIPO_ENGINE_HOSTS": ",".join(hosts[:placement.ntasks]), "AIPO_ENGINE_PORT": str(base_port)}


def free_port_block(engines: int, tries: int = 200) -> int:
    """A base port whose engine ports (base + 100 e + 0..2, e < engines) are free now."""
    import random

    chooser = random.SystemRandom()
    top = ENGINE_PORT_RANGE.stop - ENGINE_PORTS * max(1, engines)
    for _ in range(tries):
        base = chooser.randrange(ENGINE_PORT_RANGE.start, max(ENGINE_PORT_RANGE.start + 1, top))
        if all(_port_free(base + ENGINE_PORTS * e + k) for e in range(max(1, engines)) for k in range(3)):
            return base
    raise OSError(f"no free block of engine ports in {ENGINE_PORT_RANGE.start}-{ENGINE_PORT_RANGE.stop - 1}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
            return True
        except OSError:
            return False


def engine_base_port(job_id: str, restart_count: int, counter: int) -> int:
    """The engine ports of a Slurm stage: 64 slots of 100 from 12000 (below the stage ports, see
    stage_port), fresh per (job, requeue, stage) like the stage's MASTER_PORT."""
    digits = int(re.sub(r"\D", "", job_id) or "0")
    return 12000 + ((digits * 257 + restart_count * 61 + counter) % 64) * ENGINE_PORTS


def one_task(ntasks: int = 1) -> Placement:
    """`ntasks` CPU ranks on as few nodes as the launcher likes (the layout of plain commands)."""
    return Placement(ntasks=ntasks, nodes=0, ntasks_per_node=0, gpus_per_task=0)


def rank_log_dir(log_path: Path) -> Path:
    """RUN_DIR/logs/round0-sample.log -> RUN_DIR/logs/round0-sample/ (rank<K>.log inside)."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.name[:-len(".log")] if log_path.name.endswith(".log") else log_path.name + ".d")


def stage_python(environ: Optional[dict] = None) -> list[str]:
    """The stage interpreter: $AIPO_PYTHON (a path, a name on the task's PATH, or a wrapper command)."""
    env = os.environ if environ is None else environ
    return shlex.split(env.get("AIPO_PYTHON", "")) or [sys.executable]


def stage_command(argv: list[str], environ: Optional[dict] = None) -> list[str]:
    """[python, -m, argv...], inside `bash -c 'source $AIPO_SETUP; exec ...'` when AIPO_SETUP is set."""
    if not argv:
        raise ValueError("empty stage command")
    env = os.environ if environ is None else environ
    cmd = [*stage_python(env), "-m", *argv]
    setup = env.get("AIPO_SETUP")
    if setup:
        cmd = ["bash", "-c", 'source "$0" || { echo "error: sourcing AIPO_SETUP=$0 failed" >&2; exit 2; }; exec "$@"',
               setup, *cmd]
    return cmd


class _LogWatch:
    """What the rank logs of a stage gained since the watch started (marker and time-limit scan)."""

    def __init__(self, directory: Optional[Path]):
        self.directory = directory
        self.sizes = {p: p.stat().st_size for p in self._files()}

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("*.log")) if self.directory and self.directory.is_dir() else []

    def new_bytes(self) -> bytes:
        out = b""
        for p in self._files():
            with open(p, "rb") as f:
                f.seek(self.sizes.get(p, 0))
                out += f.read()
        return out


# ---------------------------------------------------------------------------------------------
# Shared machinery: signal handling and output tee.
# ---------------------------------------------------------------------------------------------


class _Base:
    def __init__(self, handle_signals: bool = True):
        self.stop_requested = False
        self._children: list[subprocess.Popen] = []
        self._tee: Optional[_Tee] = None
        self._old_handlers: dict = {}
        if handle_signals:
            self.install_signal_handlers()

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the caller handles signals
        for sig in STOP_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def close(self) -> None:
        self.restore_signal_handlers()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _on_signal(self, signum, _frame) -> None:
        self.request_stop(signum)

    def request_stop(self, signum: int = signal.SIGUSR1) -> None:
        """Ask the running stage to save and stop; no later stage starts."""
        first = not self.stop_requested
        self.stop_requested = True
        if first or self._children:
            line = (f"[launcher] got {signal.Signals(signum).name}: "
                    + ("asking the running stage to save and stop" if self._children else "no stage will start"))
            try:
                print(line, file=sys.stderr, flush=True)
            except RuntimeError:  # the signal interrupted a write to stderr on this thread
                pass
            if self._tee is not None:
                self._tee.note(line)
        for p in self._children:
            self._forward(p, signum)

    def _forward(self, proc: subprocess.Popen, signum: int) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def _stopped_before_start(self, name: str) -> Optional[StageResult]:
        if self.stop_requested:
            print(f"[launcher] {name}: not started, a stop was requested", file=sys.stderr, flush=True)
            return StageResult(0, True)
        return None

    def _result(self, code: int, marker_seen: bool, timed_out: bool = False) -> StageResult:
        # exit 0 without the trainer's marker: the stage finished its work, whatever signal came late
        stopped = marker_seen or code == EXIT_STOPPED or (code != 0 and self.stop_requested and not timed_out)
        return StageResult(code, stopped, timed_out)


class _Tee:
    """Copy a child's stdout and stderr to ours and to a log file; watch for the stop marker."""

    def __init__(self, log_path: Optional[Path], console: bool = True):
        self.console = console
        self.log: Optional[IO[bytes]] = None
        if log_path is not None:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(log_path, "ab")
        self.lock = threading.RLock()  # note() may run in a signal handler on the main thread
        self.marker_seen = False
        self.tail = b""  # the last bytes of the child's own output (srun's messages)
        self.threads: list[threading.Thread] = []

    def attach(self, proc: subprocess.Popen, prefix: bytes = b"") -> None:
        for stream, target in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=self._pump, args=(stream, target, prefix), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, stream, target, prefix: bytes) -> None:
        tail = b""
        at_line_start = True
        out = getattr(target, "buffer", None)
        for chunk in iter(lambda: stream.read1(65536), b""):
            if STOP_MARKER in tail + chunk:
                self.marker_seen = True
            tail = chunk[-len(STOP_MARKER):]
            self.tail = (self.tail + chunk)[-65536:]
            if prefix:
                lines = chunk.split(b"\n")
                chunk = b"\n".join((prefix + l if (i > 0 or at_line_start) and l else l) for i, l in enumerate(lines))
                at_line_start = chunk.endswith(b"\n")
            with self.lock:
                try:
                    if not self.console:
                        pass
                    elif out is not None:
                        out.write(chunk)
                        out.flush()
                    else:
                        target.write(chunk.decode(errors="replace"))
                        target.flush()
                except (ValueError, OSError):
                    pass  # our own stdout closed: keep draining the child
                if self.log:
                    self.log.write(chunk)
                    self.log.flush()
        stream.close()

    def note(self, line: str) -> None:
        """A line of the launcher's own into the log (not to our stdout: the caller prints it)."""
        if self.log:
            with self.lock:
                self.log.write(line.encode() + b"\n")
                self.log.flush()

    def close(self) -> None:
        for t in self.threads:
            t.join()
        if self.log:
            self.log.close()


def _header(name: str, cmd: list[str], placement: Placement, tee: _Tee) -> None:
    tee.note(f"[launcher] {name}: {placement.ntasks} task(s): {shlex.join(cmd)}")


# ---------------------------------------------------------------------------------------------
# Local: N subprocesses with a torchrun-style environment.
# ---------------------------------------------------------------------------------------------


class LocalLauncher(_Base):
    """Stages as local subprocesses. ntasks > 1: that many ranks with RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT (a free port per stage); if one rank fails the others are stopped.
    With a log_path each rank writes RUN_DIR/logs/STAGE/rank<K>.log, else it inherits our output."""

    def run(self, name: str, argv: list[str], placement: Optional[Placement] = None, env: Optional[dict] = None,
            log_path: Optional[Path] = None, time_limit_min: Optional[float] = None,
            ntasks: Optional[int] = None) -> StageResult:
        placement = placement or one_task(ntasks or 1)
        if placement.ntasks < 1:
            raise ValueError(f"ntasks={placement.ntasks}: must be >= 1")
        stopped = self._stopped_before_start(name)
        if stopped:
            return stopped
        cmd = stage_command(argv)
        port = spawn.free_port()
        if getattr(placement, "engines", 0):  # every task of this machine: address 127.0.0.1
            env = {**engine_env(placement, ["127.0.0.1"] * placement.ntasks,
                                free_port_block(placement.engines)), **(env or {})}
        tee = self._tee = _Tee(log_path, console=False)
        _header(name, cmd, placement, tee)
        rank_dir = rank_log_dir(log_path) if log_path is not None else None
        if rank_dir is not None:
            rank_dir.mkdir(parents=True, exist_ok=True)
        watch = _LogWatch(rank_dir)
        procs: list[subprocess.Popen] = []
        ntasks = placement.ntasks
        try:
            for rank in range(ntasks):
                # Always torchrun-style, even for one task: inside a Slurm batch step the inherited
                # SLURM_PROCID/SLURM_NTASKS would otherwise describe the whole job.
                log = rank_dir / f"rank{rank}.log" if rank_dir is not None else None
                p = spawn.start(cmd, spawn.rank_env(rank, ntasks, port, extra=env), log)
                procs.append(p)
                self._children.append(p)
            if self.stop_requested:  # a signal arrived while the ranks were starting
                for p in procs:
                    self._forward(p, signal.SIGUSR1)
            deadline = time.monotonic() + time_limit_min * 60 if time_limit_min else None
            code, timed_out = self._wait_all(procs, deadline)
            if timed_out:
                tee.note(f"[launcher] {name} ran past its wall-clock limit of {time_limit_min} min; stopped")
        finally:
            for p in procs:  # never leave a rank behind (an exception in here, a KeyboardInterrupt)
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self._children = [c for c in self._children if c not in procs]
            self._tee = None
            tee.close()
        marker = STOP_MARKER in watch.new_bytes() if rank_dir is not None else False
        return self._result(code, marker, timed_out)

    def _wait_all(self, procs: list[subprocess.Popen], deadline: Optional[float]) -> tuple[int, bool]:
        first_failure = 0
        kill_at = None
        timed_out = False
        while True:
            running = [p for p in procs if p.poll() is None]
            if first_failure == 0:
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if deadline is not None and running and time.monotonic() > deadline:
                    failed, timed_out = [EXIT_TIMED_OUT], True
                if failed:
                    first_failure = failed[0]
                    if running:  # do not leave the others blocked in a collective
                        print(f"[launcher] a rank exited with {first_failure}; stopping the other ranks",
                              file=sys.stderr, flush=True)
                        for p in running:
                            self._forward(p, signal.SIGTERM)
                        kill_at = time.monotonic() + KILL_GRACE_S
            if not running:
                return first_failure, timed_out
            if kill_at is not None and time.monotonic() > kill_at:
                for p in running:
                    p.kill()
                kill_at = None
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Slurm: one `srun` job step per stage, inside the current allocation.
# ---------------------------------------------------------------------------------------------


def job_hosts(environ: Optional[dict] = None) -> list[str]:
    """Host names of the allocation, in Slurm's order."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not nodelist:
        return []
    if shutil.which("scontrol"):
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, env=env)
        hosts = r.stdout.split()
        if r.returncode == 0 and hosts:
            return hosts
    return [first_host(nodelist)]


def first_host(nodelist: str) -> str:
    """'gpu[003-005,9],cpu1' -> 'gpu003' (without scontrol)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def node_address(host: str, environ: Optional[dict] = None) -> str:
    """`host` when it resolves, else the address Slurm knows for it (`scontrol show node`: NodeAddr).
    Clusters whose node names are not in DNS still get a MASTER_ADDR the tasks can reach."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    env = dict(os.environ if environ is None else environ)
    try:
        r = subprocess.run(["scontrol", "-o", "show", "node", host], capture_output=True, text=True, env=env,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return host
    for field in r.stdout.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or host
    return host


def cpus_per_node(environ: dict) -> Optional[int]:
    """The allocation's CPUs on its smallest node: SLURM_JOB_CPUS_PER_NODE '64(x8)' or '32,16(x2)'."""
    text = environ.get("SLURM_JOB_CPUS_PER_NODE") or environ.get("SLURM_CPUS_ON_NODE") or ""
    counts = [int(x.split("(")[0]) for x in text.split(",") if x.split("(")[0].isdigit()]
    return min(counts) if counts else None


def stage_port(job_id: str, restart_count: int, counter: int) -> int:
    """A port per (job, requeue, stage) in 20000..31999, below Linux's ephemeral range: consecutive
    stages of one job never reuse a port, and jobs with nearby ids are spread apart."""
    digits = int(re.sub(r"\D", "", job_id) or "0")
    return 20000 + (digits * 257 + restart_count * 61 + counter) % 12000


class SlurmLauncher(_Base):
    """Stages as `srun` job steps of the current allocation (sbatch or salloc).

    A stage placed as (ntasks N, nodes K, ntasks_per_node P) runs `srun --ntasks=N --nodes=K
    --ntasks-per-node=P --cpus-per-task=C --kill-on-bad-exit=1 --wait=W [--time=M] --export=ALL
    python -m argv...` on the first K nodes of the job, with C = the node's CPUs // P. MASTER_ADDR is
    the first of them (its Slurm NodeAddr when the name does not resolve) and MASTER_PORT is fresh
    per stage. Tasks find their GPU slice from SLURM_LOCALID and their shard from SLURM_PROCID.
    SIGTERM and SIGUSR1 reach the stage's tasks as SIGUSR1 through srun (srun answers SIGTERM by
    killing the step, so it is not forwarded as is); the trainer treats both alike: finish the
    step, save, exit.
    """

    def __init__(self, environ: Optional[dict] = None, handle_signals: bool = True, task_wait_s: int = 0):
        env = dict(os.environ if environ is None else environ)
        if not env.get("SLURM_JOB_ID"):
            raise ConfigError("--launcher slurm needs a Slurm allocation (SLURM_JOB_ID is not set): submit "
                              "with sbatch (e.g. sbatch slurm/aipo_tiny.sh), run inside salloc, or use --launcher local")
        self.srun = shutil.which("srun", path=env.get("PATH"))
        if not self.srun:
            raise ConfigError("--launcher slurm: srun is not on PATH inside this allocation")
        self._setup(env, job_hosts(env) or ["localhost"], task_wait_s)
        super().__init__(handle_signals=handle_signals)

    def _setup(self, env: dict, hosts: list[str], task_wait_s: int) -> None:
        self.environ = env
        self.job_id = env.get("SLURM_JOB_ID", "0")
        self.restart_count = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        self.hosts = hosts
        self.num_nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(self.hosts))
        self.extra_args = shlex.split(env.get("AIPO_SRUN_ARGS", ""))
        self.node_cpus = cpus_per_node(env)
        self.task_wait_s = task_wait_s
        self.counter = 0
        self._addresses: dict[str, str] = {}
        self.job_end: Optional[float] = None  # looked up at the first stage (aipo_mp/timeleft.py)

    @classmethod
    def for_plan(cls, nodes: int, environ: Optional[dict] = None, task_wait_s: int = 0) -> "SlurmLauncher":
        """A launcher that only builds commands (--dry-run): the current allocation's hosts when
        inside one, else `nodes` placeholder names; starts nothing, handles no signals."""
        self = cls.__new__(cls)
        env = dict(os.environ if environ is None else environ)
        self.srun = shutil.which("srun", path=env.get("PATH")) or "srun"
        inside = bool(env.get("SLURM_JOB_ID"))
        hosts = (job_hosts(env) if inside else []) or [f"node{i + 1:03d}" for i in range(nodes)]
        if not inside:
            env["SLURM_JOB_NUM_NODES"] = str(nodes)
        self._setup(env, hosts, task_wait_s)
        self._addresses = {h: h for h in hosts} if not inside else {}
        _Base.__init__(self, handle_signals=False)
        return self

    def master_address(self, host: str) -> str:
        if host not in self._addresses:
            self._addresses[host] = node_address(host, self.environ)
        return self._addresses[host]

    def command(self, name: str, argv: list[str], placement: Placement, log_path: Optional[Path] = None,
                time_limit_min: Optional[float] = None) -> tuple[list[str], dict]:
        """The srun command line and environment of one stage (advances the stage counter)."""
        ntasks = placement.ntasks
        nodes = max(1, min(placement.nodes or ntasks, ntasks, self.num_nodes))
        per_node = placement.ntasks_per_node or -(-ntasks // nodes)
        cmd = [self.srun, f"--job-name={name}", f"--ntasks={ntasks}", f"--nodes={nodes}",
               f"--ntasks-per-node={per_node}", "--kill-on-bad-exit=1", "--export=ALL"]
        if nodes < self.num_nodes and len(self.hosts) >= nodes:  # pin the step to the nodes MASTER_ADDR is on
            cmd.append(f"--nodelist={','.join(self.hosts[:nodes])}")
        cpus = max(1, self.node_cpus // per_node) if self.node_cpus else None
        if cpus:  # srun 22.05 no longer inherits --cpus-per-task from the allocation: size it from the node
            cmd.append(f"--cpus-per-task={cpus}")
        if self.task_wait_s:  # a hung task ends its step this long after the first task exited
            cmd.append(f"--wait={self.task_wait_s}")
        if time_limit_min:
            cmd.append(f"--time={max(1, int(round(time_limit_min)))}")
        if log_path is not None:
            cmd += [f"--output={rank_log_dir(log_path)}/rank%t.log", "--open-mode=append"]
        cmd += [*self.extra_args, *stage_command(argv, self.environ)]
        env = {k: v for k, v in self.environ.items() if k not in TORCHRUN_VARS}
        # Job-level task layout of the batch step must not leak into the step's own layout.
        for k in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_CPUS_PER_TASK"):
            env.pop(k, None)
        base_port = self.environ.get("AIPO_MASTER_PORT_BASE")
        port = (int(base_port) + self.counter) if base_port else stage_port(self.job_id, self.restart_count,
                                                                            self.counter)
        engine_port = engine_base_port(self.job_id, self.restart_count, self.counter)
        self.counter += 1
        env.update(MASTER_ADDR=self.master_address(self.hosts[0]), MASTER_PORT=str(port))
        # srun's block distribution: task k runs on the (k // per_node)-th node of the step
        task_hosts = [self.master_address(self.hosts[min(k // per_node, len(self.hosts) - 1)]) for k in range(ntasks)]
        env.update(engine_env(placement, task_hosts, engine_port))
        if cpus:
            env["OMP_NUM_THREADS"] = str(cpus)
        return cmd, env

    def run(self, name: str, argv: list[str], placement: Optional[Placement] = None, env: Optional[dict] = None,
            log_path: Optional[Path] = None, time_limit_min: Optional[float] = None,
            ntasks: Optional[int] = None) -> StageResult:
        placement = placement or one_task(ntasks or 1)
        if placement.ntasks < 1:
            raise ValueError(f"ntasks={placement.ntasks}: must be >= 1")
        stopped = self._stopped_before_start(name)
        if stopped:
            return stopped
        cmd, step_env = self.command(name, argv, placement, log_path, time_limit_min)
        if self.job_end is None:
            from aipo_mp.runtime.timeleft import slurm_job_end

            self.job_end = slurm_job_end(self.job_id, self.environ) or 0.0
        if self.job_end:  # the trainer saves and stops before the job's time runs out
            step_env["AIPO_JOB_END"] = str(self.job_end)
        step_env.update(env or {})
        rank_dir = rank_log_dir(log_path) if log_path is not None else None
        if rank_dir is not None:
            rank_dir.mkdir(parents=True, exist_ok=True)
        watch = _LogWatch(rank_dir)
        tee = self._tee = _Tee(log_path, console=log_path is None)
        _header(name, cmd, placement, tee)
        proc = subprocess.Popen(cmd, env=step_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self._children.append(proc)
        try:
            tee.attach(proc)
            if self.stop_requested:
                self._forward(proc, signal.SIGUSR1)
            while proc.poll() is None:  # a sleep loop keeps Python's signal handlers responsive
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()  # srun: SIGKILL of srun itself; slurmstepd then ends the step's tasks
                proc.wait()
            self._children.remove(proc)
            self._tee = None
            tee.close()
        new = watch.new_bytes() + (tee.tail if log_path is not None else b"")
        timed_out = proc.returncode != 0 and any(t in new for t in TIME_LIMIT_TEXT)
        return self._result(proc.returncode, tee.marker_seen or STOP_MARKER in new, timed_out)

    def _forward(self, proc: subprocess.Popen, signum: int) -> None:
        # srun forwards SIGUSR1 to every task; on SIGTERM it would cancel the step instead.
        super()._forward(proc, signal.SIGUSR1)


def make_launcher(kind: str, task_wait_s: int = 0) -> Launcher:
    if kind == "local":
        return LocalLauncher()
    if kind == "slurm":
        return SlurmLauncher(task_wait_s=task_wait_s)
    raise ConfigError(f"--launcher {kind!r}: choose local or slurm")


def requeue_self(environ: Optional[dict] = None) -> None:
    """`scontrol requeue $SLURM_JOB_ID`: put this batch job back in the queue (it restarts from its
    script with the same job id; the run resumes from its saved state). Slurm then ends this job's
    processes, so call it last. slurm/common.sh does this itself when `aipo-mp run` exits 75; use
    this only from Python code that is not started by those scripts."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise ConfigError("requeue: not inside a Slurm job (SLURM_JOB_ID is not set)")
    r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, env=dict(env))
    if r.returncode != 0:
        message = r.stderr.strip() or r.stdout.strip()
        if "disabled" in message:  # submitted with --no-requeue (or JobRequeue=0 and no --requeue)
            raise ConfigError(f"cannot requeue job {job_id}: {message}; submit with sbatch --requeue")
        raise RuntimeError(f"scontrol requeue {job_id} failed (exit {r.returncode}): {message}")
    print(f"[launcher] requeued job {job_id}", file=sys.stderr, flush=True)
