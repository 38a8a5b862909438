"""One task of a multi-engine stage (sample, reward, the rankers, compare, synthesize, kl, the
baseline's scores): which engine am I, which devices and which shards are mine, and the shard
files that survive a requeue.

A stage of E engines (one srun task, or local subprocess, per engine) splits its work into N
contiguous shards (N = E unless the stage asks for smaller shards). Engine `e` takes every E-th
shard that is not finished yet, so a preempted stage redoes only its unfinished shards. Shards are
per engine, never per task: an engine spanning several nodes has one driving task. A ranker's
shards are whole prompts (a prompt's candidates are ranked together): `prompt_shards` orders the
records prompt by prompt, and `restore_order` puts the merged records back in the input order. Each finished shard is two
files in the shard directory, written atomically in this order:

    shard_00003.jsonl   its records
    shard_00003.json    {"node", "rank", "restart", "start", "end", "records", "seconds"}: the marker

Before the step starts, the driver writes the list of unfinished shards (todo.json) so that every
task splits the same list, however late it starts; the driver merges the shards in order once
every marker exists.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from aipo_mp.runtime.files import atomic_write_json


def task_identity(environ: Optional[dict] = None) -> tuple[int, int, int, int]:
    """(rank, world, local_rank, local_world) from Slurm (SLURM_PROCID ...) or torchrun-style
    variables (RANK ...), else a single task. Slurm's win: an srun task inherits no RANK."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID") is not None and "RANK" not in env:
        rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS") or 1)
        local = int(env.get("SLURM_LOCALID", 0))
        local_world = int((env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
                          .split("(")[0].split(",")[0])
        return rank, world, local, max(1, local_world)
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    return rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world))


def engine_todo(shards: "ShardDir", engine: int, engines: int) -> list[int]:
    """The unfinished shards of engine `engine` of `engines` (every engines-th of the driver's plan):
    an engine's headless tasks serve it until none is left."""
    return [k for k in shards.planned()[engine::engines] if not shards.done(k)]


def claim_head_devices(task, gpus_per_engine: int) -> None:
    """Devices of an engine's head task before its engine starts: an engine that fits a node takes
    its slice of the node (several engines share it); a spanning engine's task holds its whole node
    (start_engine with task= binds its workers)."""
    if not task.spans:
        _, _, local_rank, local_world = task_identity()
        claim_engine_devices(local_rank, local_world, gpus_per_engine)


def prompt_shards(prompt_ids: Sequence, engines: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(order, bounds) that shard records by whole prompts: `order` lists the record positions
    prompt by prompt (prompts in order of first appearance, records in input order inside), and
    `bounds` are [start, end) ranges of `order`, each holding whole prompts, one shard per engine
    (fewer when there are fewer prompts)."""
    import json

    groups: dict[str, list[int]] = {}
    for k, pid in enumerate(prompt_ids):
        groups.setdefault(json.dumps(pid), []).append(k)
    sizes = [len(g) for g in groups.values()]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    bounds = [(offsets[a], offsets[b]) for a, b in shard_bounds(len(sizes), shard_count(len(sizes), engines))]
    return [k for g in groups.values() for k in g], bounds


def restore_order(merged: Sequence[dict], order: Sequence[int]) -> list[dict]:
    """Merged records (in `order`, as `prompt_shards` laid them out) back in input order."""
    if len(merged) != len(order):
        raise ValueError(f"{len(merged)} merged records for {len(order)} inputs")
    out: list = [None] * len(order)
    for record, position in zip(merged, order):
        out[position] = record
    return out


def node_name(environ: Optional[dict] = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def claim_engine_devices(local_rank: int, local_world: int, tensor_parallel: int) -> None:
    """Give this task its own GPUs (a `tensor_parallel` slice of CUDA_VISIBLE_DEVICES by local
    rank), or its own CPU cores, and its own vLLM port. Call before torch or vLLM start: CUDA
    reads CUDA_VISIBLE_DEVICES once."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) > tensor_parallel:  # srun bound the node's GPUs to every task: take ours
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[local_rank * tensor_parallel:
                                                              (local_rank + 1) * tensor_parallel])
    elif not visible and hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if local_world > 1 and len(cores) >= local_world:  # locally several tasks share the cores
            per = len(cores) // local_world
            cores = cores[local_rank * per:(local_rank + 1) * per]
            os.sched_setaffinity(0, set(cores))
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(cores) // tensor_parallel))
        if tensor_parallel > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            from aipo_mp.rounds.engines import cpu_bind_string

            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_string(cores, tensor_parallel)
    if "VLLM_PORT" not in os.environ:  # engines on one node must not share vLLM's ports
        base = int(os.environ.get("MASTER_PORT", "29500"))
        os.environ["VLLM_PORT"] = str(base + 100 + 20 * local_rank)


class StopFlag:
    """SIGUSR1/SIGTERM: finish the current shard, then stop (install before the slow imports)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._request)

    def _request(self, _signum, _frame) -> None:
        self.requested = True


def shard_bounds(total: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, the first `total % shards` one longer."""
    base, extra = divmod(total, shards)
    bounds, start = [], 0
    for k in range(shards):
        end = start + base + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def shard_count(total: int, world: int, per_shard: int = 0) -> int:
    """`per_shard` items per shard (0: one shard per task), never more shards than items."""
    count = -(-total // per_shard) if per_shard > 0 else world
    return max(1, min(count, total))


class ShardDir:
    """The shard files of one stage for one shard count (a different count starts afresh)."""

    def __init__(self, root: str | Path, count: int):
        self.count = count
        self.path = Path(root) / f"of{count}"

    def data(self, k: int) -> Path:
        return self.path / f"shard_{k:05d}.jsonl"

    def marker(self, k: int) -> Path:
        return self.path / f"shard_{k:05d}.json"

    def done(self, k: int) -> bool:
        return self.marker(k).is_file()

    def todo(self) -> list[int]:
        return [k for k in range(self.count) if not self.done(k)]

    def write_plan(self) -> list[int]:
        """The driver, before the step: the unfinished shards the tasks split among them."""
        todo = self.todo()
        atomic_write_json(self.path / "todo.json", todo)
        return todo

    def planned(self) -> list[int]:
        """The driver's list (a task may start after another finished a shard), else todo()."""
        from aipo_mp.errors import UserError
        from aipo_mp.runtime.json_files import read_json_list

        try:
            planned = read_json_list(self.path / "todo.json", "the shard plan", int)
        except UserError:  # missing or damaged: every task derives the same list from the markers
            return self.todo()
        return [k for k in planned if 0 <= k < self.count]

    def write(self, k: int, records: Sequence[dict], info: dict) -> None:
        from aipo_mp.data.records import write_jsonl

        write_jsonl(self.data(k), records)
        atomic_write_json(self.marker(k), {**info, "records": len(records)})

    def markers(self) -> list[dict]:
        from aipo_mp.runtime.json_files import read_json_object

        fix = "delete it so the shard is redone (rerun the same command)"
        return [read_json_object(self.marker(k), "the shard marker", {"node": str, "records": int}, fix)
                for k in range(self.count)]

    def merge(self) -> list[dict]:
        """Every shard's records in shard order; raises when a shard is missing."""
        from aipo_mp.data.records import read_jsonl
        from aipo_mp.errors import StageFailed

        missing = self.todo()
        if missing:
            raise StageFailed(f"{self.path}: shard(s) {missing[:10]} of {self.count} were not written by the stage's "
                              "tasks; look at the stage's logs and rerun the same command to redo them")
        records = []
        for k in range(self.count):
            records.extend(read_jsonl(self.data(k)))
        return records


def run_shard_task(shard_dir: ShardDir, bounds: list[tuple[int, int]], work: Callable[[int, int], list[dict]],
                   stop: StopFlag, rank: int, world: int, fixed: bool = False) -> int:
    """Do this engine's unfinished shards with `work(start, end) -> records`; 75 when a stop signal
    left some of them undone (the stage is rerun after a requeue), else 0. `rank`/`world` are the
    engine index and the engines. The shards are every `world`-th of the driver's plan, or with
    `fixed` (no driver plan: engines that meet between batches) every `world`-th shard from `rank`."""
    planned = list(range(shard_dir.count)) if fixed else shard_dir.planned()
    mine = [k for k in planned[rank::world] if not shard_dir.done(k)]
    print(f"[shards] task {rank}/{world} on {node_name()}: shards {mine} of {shard_dir.count}", flush=True)
    for n, k in enumerate(mine):
        if stop.requested:
            print(f"[shards] stopped by a signal with {len(mine) - n} shard(s) left", flush=True)
            return 75
        t0 = time.time()
        start, end = bounds[k]
        records = work(start, end)
        shard_dir.write(k, records, {"node": node_name(), "rank": rank, "restart": int(os.environ.get(
            "SLURM_RESTART_COUNT", 0) or 0), "start": start, "end": end, "seconds": round(time.time() - t0, 3)})
    return 0


def wait_for_shards(shard_dir: ShardDir, stop: StopFlag, poll_s: float = 0.2) -> bool:
    """Wait until every shard of `shard_dir` is finished (the other engines write theirs): True,
    or False when a stop signal came first. An engine that fails ends the whole step (the local
    launcher stops the other ranks, srun --kill-on-bad-exit), so no wait outlives its peers."""
    while shard_dir.todo():
        if stop.requested:
            return False
        time.sleep(poll_s)
    return True
