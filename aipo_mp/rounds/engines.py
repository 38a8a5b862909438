"""The vLLM engine lifecycle: environment and CPU binding (set here only), model-directory checks,
starting and closing an in-process engine, teacher-forced log-probs, weight reload, and replica
children (one engine per child process). Every stage that runs an engine (sampling, the reward
model, the judge, self-instruct, the KL stage) starts it here. vLLM is imported only when an
engine starts.

Engines wider than a node (docs/slurm.md#engines-that-span-nodes). A placed engine stage runs
`nodes_per_engine` tasks per engine, one per node; `engine_task()` reads which engine a task
belongs to and its node-rank from the launcher's environment (AIPO_ENGINE_NODES,
AIPO_ENGINE_HOSTS, AIPO_ENGINE_PORT). Node-rank 0 (the head) drives the engine and does the
engine's shards: `start_engine(..., task=task)` starts vLLM with the multi-node arguments (TP x PP
over nodes: nnodes/node_rank/master address; data parallel: DP size, local DP ranks, DP address
and RPC port) after telling the engine's other tasks, through a small TCP "beacon" on the head,
to start their headless part; `serve_headless(task, finished)` is what those tasks run. The beacon
also ties their lifetime to the head's: when the head process ends, however it ends, its socket
closes and every headless task stops its vLLM processes and exits (no orphaned engines).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from aipo_mp.config import SamplingConfig
from aipo_mp.errors import CheckpointError, ConfigError
from aipo_mp.runtime import spawn
from aipo_mp.runtime.json_files import read_json_object

GIB = 1 << 30
PORTS_PER_ENGINE = 100  # engine e: AIPO_ENGINE_PORT + 100 e + (0 torch.distributed, 1 DP RPC, 2 beacon, 10.. vLLM)
HEAD_WAIT_S = 600.0  # a headless task gives up when its head has not answered for this long
CPU_EXTENSION = "aipo_mp.runtime.vllm_cpu_ext.CpuSpanningExtension"


@dataclass(frozen=True)
class EngineTask:
    """One task of a placed engine stage: task `engine * nodes + node_rank` of the step."""

    engine: int  # this task's engine (shards are per engine)
    engines: int  # engines of the stage
    node_rank: int  # 0: the head, which drives the engine; > 0: headless
    nodes: int  # nodes (tasks) per engine
    head: str  # address of the engine's head task
    port: int  # this engine's base port (0: single-node engines need none)
    machine_index: int = 0  # this task's place among the step's tasks on its machine
    machine_tasks: int = 1  # the step's tasks sharing this task's machine (address)

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0

    @property
    def spans(self) -> bool:
        return self.nodes > 1

    @property
    def master_port(self) -> int:
        return self.port

    @property
    def dp_rpc_port(self) -> int:
        return self.port + 1

    @property
    def beacon_port(self) -> int:
        return self.port + 2


def _env_int(env, name: str, default: int) -> int:
    text = str(env.get(name, "") or "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise ConfigError(f"{name}={text!r} is not a non-negative integer; it is set by aipo-mp run's launcher "
                          "(unset it, or run the stage through aipo-mp run)")
    return int(text)


def _task_rank(env) -> tuple[int, int]:
    """(rank, world) read as aipo_mp/rounds/shards.py's task_identity reads them (Slurm's win: an
    srun task inherits no RANK); read here too because shards.py imports this module."""
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID") is not None and "RANK" not in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS") or 1)
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))


def engine_task(environ: Optional[dict] = None) -> EngineTask:
    """This task's engine, node-rank, head address and ports, from the launcher's environment
    (AIPO_ENGINE_NODES nodes per engine, AIPO_ENGINE_HOSTS the step's addresses in task order,
    AIPO_ENGINE_PORT a base port free for the stage). Without them: one task per engine."""
    env = os.environ if environ is None else environ
    rank, world = _task_rank(env)
    nodes = max(1, _env_int(env, "AIPO_ENGINE_NODES", 1))
    if world % nodes:
        raise ConfigError(f"AIPO_ENGINE_NODES={nodes} does not divide the step's {world} tasks; an engine spans whole "
                          "nodes, one task each (run the stage through aipo-mp run)")
    hosts = [h.strip() for h in str(env.get("AIPO_ENGINE_HOSTS", "")).split(",") if h.strip()]
    base = _env_int(env, "AIPO_ENGINE_PORT", 0)
    if nodes > 1 and (len(hosts) < world or not base):
        raise ConfigError(f"an engine spanning {nodes} nodes needs AIPO_ENGINE_HOSTS (one address per task, "
                          f"{world} here) and AIPO_ENGINE_PORT from the launcher; run the stage through aipo-mp run")
    engine, node_rank = divmod(rank, nodes)
    head = hosts[engine * nodes] if hosts else "127.0.0.1"
    mine = hosts[rank] if rank < len(hosts) else head
    same = [k for k, h in enumerate(hosts[:world]) if h == mine] if hosts else [rank]
    return EngineTask(engine=engine, engines=world // nodes, node_rank=node_rank, nodes=nodes, head=head,
                      port=base + PORTS_PER_ENGINE * engine if base else 0,
                      machine_index=same.index(rank) if rank in same else 0, machine_tasks=max(1, len(same)))


def claim_spanning_devices(task: EngineTask, workers_here: int) -> None:
    """A spanning engine's task takes its whole node (all visible GPUs). On CPU, tasks that share
    one machine (the test cluster's "nodes", the local launcher) split its cores, and every vLLM
    worker of this task gets its own cores and its own vLLM port range."""
    os.environ.setdefault("VLLM_PORT", str(task.port + 10 + 20 * task.machine_index if task.port else 29600))
    if accelerator_present() or not hasattr(os, "sched_getaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if task.machine_tasks > 1 and len(cores) >= task.machine_tasks:
        per = len(cores) // task.machine_tasks
        cores = cores[task.machine_index * per:(task.machine_index + 1) * per]
        os.sched_setaffinity(0, set(cores))
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(cores) // max(1, workers_here)))
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_string(cores, max(1, workers_here))


def workers_per_node(task: EngineTask, tensor_parallel: int, pipeline_parallel: int = 1, data_parallel: int = 1) -> int:
    """vLLM workers of one engine on each of its nodes."""
    return max(1, tensor_parallel * pipeline_parallel * data_parallel // max(1, task.nodes))


# ---------------------------------------------------------------------------------------------
# The head's beacon and the headless tasks
# ---------------------------------------------------------------------------------------------


class HeadBeacon:
    """A TCP listener on the head task (its engine's beacon port) that the engine's headless tasks
    connect to. `serve(args)` sends them one JSON line per engine start ({"serve": engine args}),
    `stop_engine()` one when it closes ({"stop": true}); when the head process ends its sockets close
    and the headless tasks stop. One per process and engine task, created on first use."""

    def __init__(self, task: EngineTask):
        self.task = task
        self.server = socket.create_server(("", task.beacon_port), reuse_port=False)
        self.peers: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, name="aipo-beacon", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.peers.append(conn)

    def wait_for_peers(self, timeout: float = HEAD_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.peers) >= self.task.nodes - 1:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine {self.task.engine}: {len(self.peers)} of {self.task.nodes - 1} headless "
                                   f"task(s) reached the head's beacon port {self.task.beacon_port} in {timeout:.0f} s")
            time.sleep(0.1)

    def send(self, message: dict) -> None:
        self.wait_for_peers()
        line = (json.dumps(message) + "\n").encode()
        with self.lock:
            for peer in self.peers:
                peer.sendall(line)

    def serve(self, engine_args: dict) -> None:
        self.send({"serve": engine_args})

    def stop_engine(self) -> None:
        try:
            self.send({"stop": True})
        except OSError:  # a headless task already gone: the step fails on its exit code
            pass


_BEACONS: dict[tuple[int, int], HeadBeacon] = {}


def head_beacon(task: EngineTask) -> HeadBeacon:
    key = (task.engine, task.beacon_port)
    if key not in _BEACONS:
        _BEACONS[key] = HeadBeacon(task)
    return _BEACONS[key]


def headless_command(model_dir: str, engine_args: dict) -> list[str]:
    """`vllm serve MODEL --headless ...` through the package's launcher (the CPU wheel needs it)."""
    return [sys.executable, "-m", "aipo_mp.runtime.vllm_cli", "serve", str(model_dir), "--headless",
            *cli_flags(engine_args)]


def serve_headless(task: EngineTask, finished: Callable[[], bool] = lambda: False,
                   log: Optional[Path] = None) -> int:
    """What a task with node-rank > 0 runs: connect to its head's beacon and run the headless part
    of every engine the head starts (`vllm serve --headless` with this node's rank), until the head
    ends. `finished()` says the engine has no work left (then a head that is gone or never came is
    not waited for). Returns 0, or the exit code of a headless vLLM that failed on its own."""
    conn = _connect_to_head(task, finished)
    if conn is None:
        return 0
    child = None
    try:
        for message in _messages(conn):
            if message is None:  # a tick: a headless vLLM that failed on its own fails the task
                if child is not None and child.poll() not in (None, 0):
                    return child.returncode
                continue
            if child is not None:
                _stop_child(child)
                child = None
            if "serve" in message:
                child = _start_headless(task, dict(message["serve"]), log)
        return 0
    finally:
        if child is not None:
            _stop_child(child)
        conn.close()
        print(f"[engine] engine {task.engine} node-rank {task.node_rank}: head ended, headless part stopped",
              flush=True)


def _start_headless(task: EngineTask, args: dict, log: Optional[Path]):
    model_dir = args.pop("model")
    data_parallel = int(args.get("data_parallel_size") or 1)
    args.update(spanning_args(task, data_parallel))
    claim_spanning_devices(task, workers_per_node(task, int(args.get("tensor_parallel_size") or 1),
                                                  int(args.get("pipeline_parallel_size") or 1), data_parallel))
    print(f"[engine] engine {task.engine} node-rank {task.node_rank}: headless part of {model_dir}", flush=True)
    return spawn.start(headless_command(model_dir, args), dict(os.environ), log, own_session=True,
                       tied_to_parent=True)


def _connect_to_head(task: EngineTask, finished: Callable[[], bool]) -> Optional[socket.socket]:
    deadline = time.monotonic() + HEAD_WAIT_S
    while True:
        try:
            return socket.create_connection((task.head, task.beacon_port), timeout=5)
        except OSError:
            if finished():
                return None
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine {task.engine} node-rank {task.node_rank}: its head at "
                                   f"{task.head}:{task.beacon_port} did not answer in {HEAD_WAIT_S:.0f} s")
            time.sleep(0.5)


def _messages(conn: socket.socket, tick_s: float = 1.0):
    """The head's messages, and None every `tick_s` without one; ends when the head closes the
    connection or its process dies."""
    conn.settimeout(tick_s)
    buffer = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            yield None
            continue
        except OSError:
            return
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def _stop_child(child, grace_s: float = 10.0) -> None:
    """SIGTERM the headless vLLM's process group (vLLM and its workers), SIGKILL after `grace_s`."""
    if child.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait_s)
            return
        except Exception:  # still running: escalate
            continue


def accelerator_present() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_engine_env(tensor_parallel: int = 1, data_parallel: int = 1) -> None:
    """vLLM settings read from the environment (set only where the user has not)."""
    on_cpu = not accelerator_present()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep stage logs readable
    if data_parallel > 1:  # DP engine cores are processes behind vLLM's async client
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if on_cpu and tensor_parallel > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # Without an explicit binding the CPU backend asserts on a single NUMA node.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_string(sorted(os.sched_getaffinity(0)), tensor_parallel)


def cpu_bind_string(cores: list[int], groups: int) -> str:
    """'0,1|2,3': `groups` disjoint core lists (cores are reused when there are fewer than groups)."""
    if len(cores) < groups:
        return "|".join(str(cores[g % len(cores)]) for g in range(groups))
    per = len(cores) // groups
    return "|".join(",".join(str(c) for c in cores[g * per:(g + 1) * per]) for g in range(groups))


def check_model_dir(model_dir: str | Path, what: str = "model") -> dict:
    """The directory's config.json; ConfigError when it is not an HF model directory."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConfigError(f"{what} directory {model_dir} does not exist")
    if not config_file.is_file():
        raise ConfigError(f"{what} directory {model_dir} has no readable config.json; give a Hugging Face "
                          "model directory (export a Megatron checkpoint to HF first)")
    config = read_json_object(config_file, f"the {what}'s config.json", fix="restore the model's config.json, "
                              "or give a Hugging Face model directory (export a Megatron checkpoint to HF first)",
                              error=ConfigError)
    if not accelerator_present():
        head_dim = config.get("head_dim") or (
            config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1)))
        if head_dim and head_dim < 32:
            raise ConfigError(f"{what} {model_dir} has head_dim={head_dim}; vLLM's CPU backend needs head_dim >= 32")
    return config


def engine_in_use() -> bool:
    """Whether an in-process vLLM engine is alive in this process (its parallel state is global)."""
    parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    return bool(parallel_state and parallel_state.model_parallel_is_initialized())


def start_engine(model_dir: str | Path, *, runner: str = "generate", tensor_parallel: int = 1, seed: int = 0,
                 dtype: Optional[str] = None, kv_cache_gib: float = 1.0, max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9, what: str = "model", pipeline_parallel: int = 1,
                 data_parallel: int = 1, expert_parallel: bool = False, task: Optional[EngineTask] = None):
    """A vLLM engine on an HF directory: eager mode, fp32 and a `kv_cache_gib` KV cache on CPU.
    (An explicit VLLM_CPU_KVCACHE_SPACE in the environment overrides kv_cache_gib.)

    `task` (from `engine_task()`): the head of an engine spanning nodes; its headless tasks are
    told to start their part first. With data_parallel > 1 the engine is vLLM's async engine
    behind an `LLM`-like driver (`DataParallelEngine`): vLLM's `LLM` refuses DP."""
    check_model_dir(model_dir, what)
    configure_engine_env(tensor_parallel * pipeline_parallel, data_parallel)
    kwargs = engine_args(model_dir, runner=runner, tensor_parallel=tensor_parallel, seed=seed, dtype=dtype,
                         kv_cache_gib=kv_cache_gib, max_model_len=max_model_len,
                         gpu_memory_utilization=gpu_memory_utilization, pipeline_parallel=pipeline_parallel,
                         data_parallel=data_parallel, expert_parallel=expert_parallel)
    beacon = None
    if task is not None and task.spans:
        if not task.is_head:
            raise ValueError("start_engine on a headless task; it runs serve_headless")
        claim_spanning_devices(task, workers_per_node(task, tensor_parallel, pipeline_parallel, data_parallel))
        beacon = head_beacon(task)
        beacon.serve(kwargs)  # the headless parts start beside ours
        kwargs.update(spanning_args(task, data_parallel))
    if data_parallel > 1:
        llm = DataParallelEngine(kwargs)
    else:
        from vllm import LLM

        llm = LLM(**kwargs)
    if beacon is not None:
        llm._aipo_beacon = beacon
    return llm


def engine_args(model_dir: str | Path, *, runner: str, tensor_parallel: int, seed: int, dtype: Optional[str],
                kv_cache_gib: float, max_model_len: Optional[int], gpu_memory_utilization: float,
                pipeline_parallel: int = 1, data_parallel: int = 1, expert_parallel: bool = False) -> dict:
    """vLLM engine arguments (EngineArgs names) of one engine, the same on every node of it."""
    on_cpu = not accelerator_present()
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), runner=runner, tensor_parallel_size=tensor_parallel, seed=seed,
        dtype=dtype or ("float32" if on_cpu else "auto"), enforce_eager=True, max_model_len=max_model_len,
    )
    if pipeline_parallel > 1:
        kwargs["pipeline_parallel_size"] = pipeline_parallel
    if data_parallel > 1:
        kwargs["data_parallel_size"] = data_parallel
    if expert_parallel:
        kwargs["enable_expert_parallel"] = True
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        # A chunked prefill discards the partial request's sampled token and rewinds its seeded
        # generator, which the CPU generator cannot do ("CPU Generator does not use offset").
        kwargs["enable_chunked_prefill"] = False
        if data_parallel > 1 or expert_parallel:  # the CPU build lacks what DP/EP MoE needs
            kwargs["worker_extension_cls"] = CPU_EXTENSION
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return kwargs


def spanning_args(task: EngineTask, data_parallel: int) -> dict:
    """The multi-node arguments of `task`'s part of its engine. Without DP the TP x PP workers
    span the nodes (torch.distributed at the head's master port); with DP each node holds whole
    DP ranks (`data_parallel / nodes` of them) that meet the head at its DP RPC port."""
    if data_parallel <= 1:
        return dict(nnodes=task.nodes, node_rank=task.node_rank, master_addr=task.head,
                    master_port=task.master_port, distributed_executor_backend="mp")
    if data_parallel % task.nodes:
        raise ConfigError(f"a data-parallel engine of {data_parallel} DP ranks cannot span {task.nodes} nodes: each "
                          "node holds whole DP ranks; make data_parallel a multiple of the nodes per engine")
    local = data_parallel // task.nodes
    args: dict[str, Any] = dict(data_parallel_size_local=local, data_parallel_address=task.head,
                                data_parallel_rpc_port=task.dp_rpc_port)
    if not task.is_head:
        args["data_parallel_start_rank"] = task.node_rank * local
    return args


def cli_flags(kwargs: dict) -> list[str]:
    """EngineArgs keyword arguments as `vllm serve` flags (None: left out)."""
    flags = []
    for key, value in kwargs.items():
        if value is None or key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def engine_kwargs(spec: SamplingConfig) -> dict:
    return dict(tensor_parallel=spec.tensor_parallel, seed=spec.seed, dtype=spec.dtype, kv_cache_gib=spec.kv_cache_gib,
                max_model_len=spec.max_model_len, gpu_memory_utilization=spec.gpu_memory_utilization,
                pipeline_parallel=spec.pipeline_parallel, data_parallel=spec.data_parallel,
                expert_parallel=spec.expert_parallel)


class DataParallelEngine:
    """The head's driver of a data-parallel engine, used like vLLM's `LLM` (generate with one
    SamplingParams per prompt, get_tokenizer, model_config, collective_rpc, reset_prefix_cache):
    vLLM's async engine, whose client spreads requests over every DP rank of the engine (local
    and on the other nodes), run on an event loop in a thread of its own."""

    def __init__(self, kwargs: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aipo-vllm-dp", daemon=True)
        self._thread.start()

        async def make():
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

        self.engine = self._run(make())
        self.llm_engine = self.engine  # is_engine()
        self.model_config = self.engine.model_config

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def generate(self, prompts, params, use_tqdm: bool = False):
        from vllm.sampling_params import RequestOutputKind

        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)

        async def one(prompt, sampling):
            sampling = sampling.clone()
            sampling.output_kind = RequestOutputKind.FINAL_ONLY
            final = None
            async for output in self.engine.generate(prompt, sampling, f"aipo-{next(self._ids)}"):
                final = output
            return final

        async def every():
            return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))

        return self._run(every())

    def collective_rpc(self, method: str, kwargs: Optional[dict] = None):
        return self._run(self.engine.collective_rpc(method, kwargs=kwargs))

    def reset_prefix_cache(self):
        return self._run(self.engine.reset_prefix_cache())

    def shutdown(self) -> None:
        engine, self.engine, self.llm_engine = self.engine, None, None
        try:  # shut down here, not in AsyncLLM.__del__ at interpreter exit (module globals gone by then)
            if engine is not None:
                engine.shutdown()
            del engine
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


def close_engine(llm) -> None:
    """Shut an engine down. This also tears down vLLM's process-global parallel state, which any
    other in-process engine of this process still uses: close the last one only. The headless
    parts of a spanning engine stop with it."""
    beacon = getattr(llm, "_aipo_beacon", None)
    try:
        if isinstance(llm, DataParallelEngine):
            llm.shutdown()
        else:
            llm.llm_engine.engine_core.shutdown()
    except Exception:  # already shut down
        pass
    if beacon is not None:
        beacon.stop_engine()
    del llm
    gc.collect()


def is_engine(model) -> bool:
    return hasattr(model, "llm_engine") and hasattr(model, "generate")


def replica_env(k: int, replicas: int, tensor_parallel: int) -> dict[str, str]:
    """Environment of replica k: its own GPUs, or its own CPU cores."""
    env = dict(os.environ)
    if accelerator_present():
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        need = replicas * tensor_parallel
        if len(devices) < need:
            raise ConfigError(f"sampling.replicas={replicas} x sampling.tensor_parallel={tensor_parallel} needs {need} "
                              f"GPUs; {len(devices)} are visible")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[k * tensor_parallel:(k + 1) * tensor_parallel])
        return env
    cores = sorted(os.sched_getaffinity(0))
    if replicas > 1:
        per = max(1, len(cores) // replicas)
        start = (k * per) % len(cores)
        cores = cores[start:start + per]
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(cores) // tensor_parallel)))
    if tensor_parallel > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_string(cores, tensor_parallel)
    env["AIPO_CPU_CORES"] = ",".join(str(c) for c in cores)  # the child pins itself to these
    return env


def logprobs_of(model, token_id_lists: Sequence[Sequence[int]], **engine_options) -> list[list[float]]:
    """log p(t_k | t_<k) for k = 1..len-1 of every token list (teacher forcing; the first token
    has no log-prob, so a list of L tokens gives L-1 values). `model` is a live `LLM` or an HF
    directory (then `engine_options` go to `start_engine`)."""
    if is_engine(model):
        return _prompt_logprobs(model, token_id_lists)
    if engine_in_use():
        raise ConfigError("another vLLM engine is alive in this process; pass that engine (or close it) "
                          "instead of a model directory")
    llm = start_engine(model, **engine_options)
    try:
        return _prompt_logprobs(llm, token_id_lists)
    finally:
        close_engine(llm)


def _prompt_logprobs(llm, token_id_lists) -> list[list[float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = llm.model_config.max_model_len
    prompts = []
    for k, ids in enumerate(token_id_lists):
        ids = [int(t) for t in ids]
        if not ids:
            raise ConfigError(f"token list {k} is empty")
        if len(ids) >= max_len:
            raise ConfigError(f"token list {k} has {len(ids)} tokens; max_model_len is {max_len}")
        prompts.append(TokensPrompt(prompt_token_ids=ids))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for prompt, output in zip(prompts, outputs):
        ids = prompt["prompt_token_ids"]
        entries = output.prompt_logprobs or [None]
        values = [entry[token].logprob for token, entry in zip(ids[1:], entries[1:])]
        if len(values) != len(ids) - 1:
            raise RuntimeError(f"vLLM returned {len(values)} prompt log-probs for {len(ids)} tokens")
        result.append([float(v) for v in values])
    return result


def reload_weights(llm, hf_dir: str | Path) -> None:
    """Load the HF safetensors weights of `hf_dir` (same architecture) into a live engine, and drop
    the prefix cache, whose KV entries were computed with the old weights."""
    hf_dir = Path(hf_dir)
    if not any(hf_dir.glob("*.safetensors")):
        raise CheckpointError(f"{hf_dir} holds no *.safetensors files; reload_weights needs an HF safetensors directory")
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(hf_dir)})
    llm.reset_prefix_cache()


def pin_to_assigned_cores() -> None:
    cores = os.environ.get("AIPO_CPU_CORES")
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except OSError:
            pass


def run_children(module: str, jobs: list[tuple[list[str], dict]], workdir: Path) -> None:
    """Run `python -m module args` for every (args, env) job in parallel; raise on any failure.
    A child that hit a ConfigError writes it to its `--out` path + '.error' and exits 2."""
    procs = [(spawn.start(spawn.module_command(module, args), env, workdir / f"child{k}.log"), args)
             for k, (args, env) in enumerate(jobs)]
    failures = []
    for k, (proc, args) in enumerate(procs):
        rc = proc.wait()
        if rc == 0:
            continue
        error_file = Path(args[args.index("--out") + 1] + ".error")
        if error_file.exists():
            raise ConfigError(error_file.read_text().strip())
        tail = (workdir / f"child{k}.log").read_text().strip().splitlines()[-25:]
        failures.append(f"{module} child {k} exited with {rc}:\n" + "\n".join(tail))
    if failures:
        raise RuntimeError("\n\n".join(failures))
