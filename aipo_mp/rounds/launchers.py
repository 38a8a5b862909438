"""How `aipo-mp run` starts each stage: local subprocesses, or `srun` job steps inside a Slurm
allocation. A stage is an aipo_mp command without the interpreter, e.g.
["aipo_mp.cli", "train", cfg, "parallel.tp=2"] meaning `python -m aipo_mp.cli train ...`;
`ntasks` > 1 starts that many ranks of it.

Stopping (preemption, time limit). A launcher handles SIGTERM and SIGUSR1 from its creation on:
it forwards the signal to the running stage (which saves and exits) and remembers it, and once a
stop was requested no further stage starts. `StageResult.stopped_by_signal` is true when the stage
was stopped (a signal reached the launcher during or before it, the stage printed the trainer's
"stopped by signal" marker, or it exited with EXIT_STOPPED). The caller must then not record the
stage as done and should exit with EXIT_STOPPED (75), which tells slurm/common.sh to requeue the job.

    launcher = make_launcher("slurm")            # or "local"
    result = launcher.run("round0-train", ["aipo_mp.cli", "train", cfg], ntasks=8, log_path=log)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Protocol

from aipo_mp.config import ConfigError
from aipo_mp.platform import EXIT_STOPPED  # 75: stopped, state saved; slurm/common.sh requeues on it

STOP_MARKER = b"stopped by signal"  # what the trainer prints when it saved and stopped on a signal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
KILL_GRACE_S = 10.0  # after one rank failed: SIGTERM to the others, SIGKILL this much later


@dataclass
class StageResult:
    returncode: int  # the stage's exit code (several ranks: the first failure, else 0)
    stopped_by_signal: bool  # stopped (saved, or not started): rerun the stage after a requeue

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.stopped_by_signal


class Launcher(Protocol):
    stop_requested: bool

    def run(self, name: str, argv: list[str], ntasks: int = 1, env: Optional[dict] = None,
            log_path: Optional[Path] = None) -> StageResult: ...


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


class _Tee:
    """Copy a child's stdout and stderr to ours and to a log file; watch for the stop marker."""

    def __init__(self, log_path: Optional[Path]):
        self.log: Optional[IO[bytes]] = None
        if log_path is not None:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(log_path, "ab")
        self.lock = threading.RLock()  # note() may run in a signal handler on the main thread
        self.marker_seen = False
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
            if prefix:
                lines = chunk.split(b"\n")
                chunk = b"\n".join((prefix + l if (i > 0 or at_line_start) and l else l) for i, l in enumerate(lines))
                at_line_start = chunk.endswith(b"\n")
            with self.lock:
                try:
                    if out is not None:
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


def _python_command(argv: list[str]) -> list[str]:
    if not argv:
        raise ValueError("empty stage command")
    return [sys.executable, "-m", *argv]


def _header(name: str, cmd: list[str], ntasks: int, tee: _Tee) -> None:
    tee.note(f"[launcher] {name}: {ntasks} task(s): {shlex.join(cmd)}")


# ---------------------------------------------------------------------------------------------
# Local: N subprocesses with a torchrun-style environment.
# ---------------------------------------------------------------------------------------------


class LocalLauncher(_Base):
    """Stages as local subprocesses. ntasks > 1: that many ranks with RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT (a free port per stage); if one rank fails the others are stopped."""

    def run(self, name: str, argv: list[str], ntasks: int = 1, env: Optional[dict] = None,
            log_path: Optional[Path] = None) -> StageResult:
        if ntasks < 1:
            raise ValueError(f"ntasks={ntasks}: must be >= 1")
        stopped = self._stopped_before_start(name)
        if stopped:
            return stopped
        from aipo_mp.platform import free_port  # platform imports torch: only when a stage starts

        cmd = _python_command(argv)
        port = free_port()
        tee = self._tee = _Tee(log_path)
        _header(name, cmd, ntasks, tee)
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(ntasks):
                child_env = dict(os.environ)
                # Always torchrun-style, even for one task: inside a Slurm batch step the inherited
                # SLURM_PROCID/SLURM_NTASKS would otherwise describe the whole job.
                child_env.update(RANK=str(rank), WORLD_SIZE=str(ntasks), LOCAL_RANK=str(rank),
                                 LOCAL_WORLD_SIZE=str(ntasks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ntasks)))
                child_env.update(env or {})
                p = subprocess.Popen(cmd, env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
                procs.append(p)
                self._children.append(p)
                tee.attach(p, prefix=f"[rank{rank}] ".encode() if ntasks > 1 and rank > 0 else b"")
            if self.stop_requested:  # a signal arrived while the ranks were starting
                for p in procs:
                    self._forward(p, signal.SIGUSR1)
            code = self._wait_all(procs)
        finally:
            for p in procs:  # never leave a rank behind (an exception in here, a KeyboardInterrupt)
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self._children = [c for c in self._children if c not in procs]
            self._tee = None
            tee.close()
        stopped = self.stop_requested or tee.marker_seen or code == EXIT_STOPPED
        return StageResult(code, stopped)

    def _wait_all(self, procs: list[subprocess.Popen]) -> int:
        first_failure = 0
        kill_at = None
        while True:
            running = [p for p in procs if p.poll() is None]
            if first_failure == 0:
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if failed:
                    first_failure = failed[0]
                    if running:  # do not leave the others blocked in a collective
                        print(f"[launcher] a rank exited with {first_failure}; stopping the other ranks",
                              file=sys.stderr, flush=True)
                        for p in running:
                            self._forward(p, signal.SIGTERM)
                        kill_at = time.monotonic() + KILL_GRACE_S
            if not running:
                return first_failure
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
    from aipo_mp.platform import first_slurm_host

    return [first_slurm_host(nodelist)]


def stage_port(job_id: str, restart_count: int, counter: int) -> int:
    """A port per (job, requeue, stage) in 20000..31999, below Linux's ephemeral range: consecutive
    stages of one job never reuse a port, and jobs with nearby ids are spread apart."""
    digits = int(re.sub(r"\D", "", job_id) or "0")
    return 20000 + (digits * 257 + restart_count * 61 + counter) % 12000


class SlurmLauncher(_Base):
    """Stages as `srun` job steps of the current allocation (sbatch or salloc).

    Each stage runs `srun --ntasks=N --nodes=K --ntasks-per-node=N/K --kill-on-bad-exit=1
    --export=ALL python -m argv...` on the first K = min(N, nodes) nodes of the job; MASTER_ADDR is
    the first of them and MASTER_PORT is fresh per stage. Extra srun flags for every stage come from
    AIPO_SRUN_ARGS (e.g. "--gpu-bind=none --mpi=pmix --container-image=..."). SIGTERM and SIGUSR1
    reach the stage's tasks as SIGUSR1 through srun (srun answers SIGTERM by killing the step, so
    it is not forwarded as is); the trainer treats both alike: finish the step, save, exit 0.
    """

    def __init__(self, environ: Optional[dict] = None, handle_signals: bool = True):
        env = dict(os.environ if environ is None else environ)
        if not env.get("SLURM_JOB_ID"):
            raise ConfigError("--launcher slurm needs a Slurm allocation (SLURM_JOB_ID is not set): submit "
                              "with sbatch (e.g. sbatch slurm/aipo_tiny.sh), run inside salloc, or use --launcher local")
        self.srun = shutil.which("srun", path=env.get("PATH"))
        if not self.srun:
            raise ConfigError("--launcher slurm: srun is not on PATH inside this allocation")
        self.environ = env
        self.job_id = env["SLURM_JOB_ID"]
        self.restart_count = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        self.hosts = job_hosts(env) or ["localhost"]
        self.num_nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(self.hosts))
        self.extra_args = shlex.split(env.get("AIPO_SRUN_ARGS", ""))
        self.counter = 0
        super().__init__(handle_signals=handle_signals)

    def command(self, name: str, argv: list[str], ntasks: int) -> tuple[list[str], dict]:
        """The srun command line and environment of one stage (advances the stage counter)."""
        nodes = max(1, min(ntasks, self.num_nodes))
        cmd = [self.srun, f"--job-name={name}", f"--ntasks={ntasks}", f"--nodes={nodes}", "--kill-on-bad-exit=1",
               "--export=ALL"]
        if ntasks % nodes == 0:  # even spread (else srun would fill the first nodes' CPUs first)
            cmd.append(f"--ntasks-per-node={ntasks // nodes}")
        if nodes < self.num_nodes and len(self.hosts) >= nodes:  # pin the step to the nodes MASTER_ADDR is on
            cmd.append(f"--nodelist={','.join(self.hosts[:nodes])}")
        cpus = self.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # srun 22.05 no longer inherits it from the allocation
            cmd.append(f"--cpus-per-task={cpus}")
        cmd += [*self.extra_args, *_python_command(argv)]
        env = {k: v for k, v in self.environ.items() if k not in TORCHRUN_VARS}
        # Job-level task layout of the batch step must not leak into the step's own layout.
        for k in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            env.pop(k, None)
        base_port = self.environ.get("AIPO_MASTER_PORT_BASE")
        port = (int(base_port) + self.counter) if base_port else stage_port(self.job_id, self.restart_count,
                                                                            self.counter)
        self.counter += 1
        env.update(MASTER_ADDR=self.hosts[0], MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", cpus or "1")
        return cmd, env

    def run(self, name: str, argv: list[str], ntasks: int = 1, env: Optional[dict] = None,
            log_path: Optional[Path] = None) -> StageResult:
        if ntasks < 1:
            raise ValueError(f"ntasks={ntasks}: must be >= 1")
        stopped = self._stopped_before_start(name)
        if stopped:
            return stopped
        cmd, step_env = self.command(name, argv, ntasks)
        step_env.update(env or {})
        tee = self._tee = _Tee(log_path)
        _header(name, cmd, ntasks, tee)
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
        code = proc.returncode
        stopped = self.stop_requested or tee.marker_seen or code == EXIT_STOPPED
        return StageResult(code, stopped)

    def _forward(self, proc: subprocess.Popen, signum: int) -> None:
        # srun forwards SIGUSR1 to every task; on SIGTERM it would cancel the step instead.
        super()._forward(proc, signal.SIGUSR1)


def make_launcher(kind: str) -> Launcher:
    if kind == "local":
        return LocalLauncher()
    if kind == "slurm":
        return SlurmLauncher()
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
