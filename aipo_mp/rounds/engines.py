"""The vLLM engine lifecycle: environment and CPU binding (set here only), model-directory checks,
starting and closing an in-process engine, teacher-forced log-probs, weight reload, and replica
children (one engine per child process). Every stage that runs an engine (sampling, the reward
model, the judge, self-instruct, the KL stage) starts it here. vLLM is imported only when an
engine starts."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from aipo_mp.config import SamplingConfig
from aipo_mp.errors import CheckpointError, ConfigError
from aipo_mp.runtime import spawn
from aipo_mp.runtime.json_files import read_json_object

GIB = 1 << 30


def accelerator_present() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_engine_env(tensor_parallel: int = 1) -> None:
    """vLLM settings read from the environment (set only where the user has not)."""
    on_cpu = not accelerator_present()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep stage logs readable
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
                 gpu_memory_utilization: float = 0.9, what: str = "model"):
    """A vLLM `LLM` on an HF directory: eager mode, fp32 and a `kv_cache_gib` KV cache on CPU.
    (An explicit VLLM_CPU_KVCACHE_SPACE in the environment overrides kv_cache_gib.)"""
    check_model_dir(model_dir, what)
    configure_engine_env(tensor_parallel)
    from vllm import LLM

    on_cpu = not accelerator_present()
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), runner=runner, tensor_parallel_size=tensor_parallel, seed=seed,
        dtype=dtype or ("float32" if on_cpu else "auto"), enforce_eager=True, max_model_len=max_model_len,
    )
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        # A chunked prefill discards the partial request's sampled token and rewinds its seeded
        # generator, which the CPU generator cannot do ("CPU Generator does not use offset").
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return LLM(**kwargs)


def engine_kwargs(spec: SamplingConfig) -> dict:
    return dict(tensor_parallel=spec.tensor_parallel, seed=spec.seed, dtype=spec.dtype, kv_cache_gib=spec.kv_cache_gib,
                max_model_len=spec.max_model_len, gpu_memory_utilization=spec.gpu_memory_utilization)


def close_engine(llm) -> None:
    """Shut an engine down. This also tears down vLLM's process-global parallel state, which any
    other in-process engine of this process still uses: close the last one only."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # already shut down
        pass
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
