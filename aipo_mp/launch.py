"""Start N local ranks of a command (what `--nproc-per-node` does), torchrun-style environment,
without torchrun's agent. The parent forwards SIGTERM/SIGUSR1 to the ranks so they can save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional

from aipo_mp.platform import free_port


def launch_local(nproc: int, argv: list[str], port: Optional[int] = None, env_extra: Optional[dict] = None) -> int:
    """Run `python -m aipo_mp.cli argv` as `nproc` ranks; returns the worst exit code."""
    port = port or free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        env.update(env_extra or {})
        procs.append(subprocess.Popen([sys.executable, "-m", "aipo_mp.cli", *argv], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
        if any(codes):  # one rank failed: do not leave the others blocked in a collective
            for p in procs:
                if p.poll() is None:
                    p.kill()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return max(codes, key=lambda c: abs(c))
