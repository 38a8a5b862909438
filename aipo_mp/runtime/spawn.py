"""The one process spawner: every child process of aipo_mp (the local launcher's ranks, the
converters' ranks, vLLM replica children, the tests' gloo ranks) is started and watched here.

- `rank_env`: the torchrun-style environment of one of `world` ranks (RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on top of ours.
- `start`: `python -m module args` (or any command) with its output to a log file or a pipe.
- `wait_for_first_failure`: poll children until all ended, one failed, or a deadline passed.
- `die_with_parent`: a child that never outlives its parent (below).

A worker started in its own session (so a terminal's Ctrl-C reaches only the parent, which then
stops the workers in order) would otherwise outlive a parent killed with SIGKILL, finish and
publish its output. `die_with_parent` (a Popen preexec_fn, Linux) asks the kernel to send the
child SIGTERM when its parent dies; the child then cleans up as on any SIGTERM."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]  # the checkout: children import this copy of aipo_mp


# Local rendezvous ports come from here: below Linux's ephemeral range (32768-60999), where the
# kernel picks the local ports of outgoing connections (gloo opens many), so a port found free
# cannot be taken by a connection before rank 0 binds it; and apart from the Slurm stage ports
# (20000-31999, rounds/launchers.py stage_port).
LOCAL_PORTS = range(10000, 20000)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free now (each bound on every interface, as a rendezvous
    server binds it). Random, so concurrent launches on one machine do not try the same ones."""
    chooser = random.SystemRandom()
    found: list[int] = []
    for _ in range(100 * count):
        port = chooser.choice(LOCAL_PORTS)
        if port in found:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:  # in use, or in TIME_WAIT
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise OSError(f"no {count} free TCP ports in {LOCAL_PORTS.start}-{LOCAL_PORTS.stop - 1}")


def free_port() -> int:
    return free_ports(1)[0]


def rank_env(rank: int, world: int, port: int, extra: Optional[dict] = None, threads: Optional[int] = None,
             checkout_on_path: bool = False) -> dict[str, str]:
    """Our environment plus rank `rank` of `world` local ranks (torchrun's variables),
    OMP_NUM_THREADS (unless set: the cores split over the ranks), optionally this checkout on
    PYTHONPATH (workers of a command run from the source tree), and `extra` last."""
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if checkout_on_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // world)))
    env.update(extra or {})
    return env


def module_command(module: str, args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def start(cmd: Sequence[str], env: dict, log: Optional[Path] = None, *, pipe: bool = False,
          own_session: bool = False, tied_to_parent: bool = False, cwd: Optional[Path] = None) -> subprocess.Popen:
    """Start one child: stdout and stderr to `log` (appended), to a pipe (`pipe`), or inherited.
    `own_session`: Ctrl-C of a terminal reaches only us; `tied_to_parent`: SIGTERM when we die."""
    out: Optional[IO] = open(log, "ab") if log is not None else None
    try:
        return subprocess.Popen(list(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=out if out else (subprocess.PIPE if pipe else None),
                                stderr=subprocess.STDOUT if (out or pipe) else None, text=pipe and not out,
                                start_new_session=own_session,
                                preexec_fn=die_with_parent() if tied_to_parent else None)
    finally:
        if out:
            out.close()


def wait_for_first_failure(procs: Sequence[subprocess.Popen], deadline: Optional[float] = None,
                           poll_s: float = 0.1) -> tuple[Optional[int], bool]:
    """Poll until every child ended (None, False), one exited non-zero (its index, False), or the
    monotonic `deadline` passed (None, True). The caller decides how to stop the others."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [k for k, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            return failed[0], False
        if all(c is not None for c in codes):
            return None, False
        if deadline is not None and time.monotonic() > deadline:
            return None, True
        time.sleep(poll_s)

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn for subprocess.Popen."""
    parent = os.getpid()  # evaluated in the parent, before the fork

    def preexec() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
        except (OSError, AttributeError):  # not Linux: no parent-death signal
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec

