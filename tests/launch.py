"""Start N gloo ranks of a Python module as subprocesses (like torchrun, without its agent) and
report their exit codes and output. Used by the distributed tests (through aipo_mp's one spawner).

Each rank writes to its own log file, not a pipe: a rank blocked writing into a full pipe while
another rank waits for it in a collective would hang the launch. The first rank to fail stops the
others; a launch that hangs is stopped with SIGABRT, so that every rank's Python stack (the
fault handler is on) lands in the assertion message."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

from aipo_mp.runtime import spawn

ROOT = Path(__file__).resolve().parents[1]
PORTS_ENV = "AIPO_TEST_PORTS"  # free ports for workers that start several process groups in a row


def run_ranks(world_size: int, module: str, args: list[str], timeout: int = 600, env_extra: dict | None = None):
    port, *more = spawn.free_ports(33)  # the rendezvous port and one per command of a multi-command worker
    extra = {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", PORTS_ENV: ",".join(map(str, more)),
             **(env_extra or {})}
    with tempfile.TemporaryDirectory(prefix="ranks.") as logs:
        paths = [Path(logs) / f"rank{rank}.log" for rank in range(world_size)]
        procs = [spawn.start(spawn.module_command(module, args),
                             spawn.rank_env(rank, world_size, port, extra, checkout_on_path=True), log=path, cwd=ROOT)
                 for rank, path in enumerate(paths)]
        failed, timed_out = spawn.wait_for_first_failure(procs, deadline=time.monotonic() + timeout)
        stop(procs, signal.SIGABRT if timed_out else signal.SIGTERM, grace=0 if timed_out else 5)
        outputs = [path.read_text(errors="replace") for path in paths]
    codes = [p.returncode for p in procs]
    if timed_out or any(codes):
        what = f"timed out after {timeout}s (stacks below)" if timed_out else f"failed with exit codes {codes}"
        raise AssertionError(f"{module} {what}:\n" + "\n".join(
            f"--- rank {r} ---\n{o[-4000:]}" for r, o in enumerate(outputs)))
    return outputs


def stop(procs, sig: int, grace: float) -> None:
    """After `grace` seconds for the ranks to end by themselves (the others of a failed rank
    usually report their own error), signal every rank still running; kill what is left."""
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + 5
    for p in procs:
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            p.kill()
            p.wait()
