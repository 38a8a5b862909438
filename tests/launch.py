"""Start N gloo ranks of a Python module as subprocesses (like torchrun, without its agent) and
report their exit codes and output. Used by the distributed tests (through aipo_mp's one spawner)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from aipo_mp.runtime import spawn

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(world_size: int, module: str, args: list[str], timeout: int = 600, env_extra: dict | None = None):
    port = spawn.free_port()
    procs = [spawn.start(spawn.module_command(module, args),
                         spawn.rank_env(rank, world_size, port, {"OMP_NUM_THREADS": "1", **(env_extra or {})},
                                        checkout_on_path=True), pipe=True, cwd=ROOT)
             for rank in range(world_size)]
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
