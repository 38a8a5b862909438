"""Start N gloo ranks of a Python module as subprocesses (like torchrun, without its agent) and
report their exit codes and output. Used by the distributed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aipo_mp.runtime.platform import free_port

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(world_size: int, module: str, args: list[str], timeout: int = 600, env_extra: dict | None = None):
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
            PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        )
        env.update(env_extra or {})
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{module} ranks timed out after {timeout}s")
        outputs.append(out)
    codes = [p.returncode for p in procs]
    if any(codes):
        raise AssertionError(f"{module} failed with exit codes {codes}:\n" + "\n".join(
            f"--- rank {r} ---\n{o[-4000:]}" for r, o in enumerate(outputs)))
    return outputs
