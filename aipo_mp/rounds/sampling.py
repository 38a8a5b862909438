"""Sample answers from the policy with vLLM: the first stage of a round.

`sample(model, prompts, spec, out_path)` writes `samples.jsonl`, one line per (prompt, sample):

    {"prompt_id", "prompt" (as given), "sample_index", "text", "num_tokens", "finish_reason",
     "chat_format", "num_prompt_tokens", ["meta"]}

* `num_tokens` counts the generated tokens, EOS included when the answer stopped on it;
  `finish_reason` is "stop" (EOS or a stop string) or "length" (cut by `max_tokens` or the
  model's context length).
* Prompt rendering follows the trainer's tokenization contract (`aipo_mp.data.pairs`) so the pairs
  train on exactly the prompt tokens the policy sampled from:
    - a chat prompt (list of {role, content}) always goes through the tokenizer's chat template
      with the generation prompt added (no template -> ConfigError);
    - a string prompt goes through the template as one user message when `spec.chat_template`
      is true and the tokenizer has a template (`chat_format: true`; the pairs builder then
      writes the prompt as that one-message list), else it is tokenized as plain text with the
      tokenizer's own special tokens (`tokenizer(prompt).input_ids`, `chat_format: false`).
* Seeds: prompt i (its position in the whole prompt list) samples with its own seed, derived
  from (spec.seed, i) by a hash; vLLM gives its n samples seed_i + 0..n-1. A prompt's samples
  therefore depend neither on the other prompts in the batch nor on how the prompts are split
  across replicas, as long as the forward pass itself is batch invariant (it is on CPU in fp32;
  on GPUs bf16 kernels can differ with the batch shape, so replicas may change rare tokens).
* `replicas > 1`: data parallel sampling. The prompts are split into contiguous shards, each run
  by its own engine in its own process (`python -m aipo_mp.rounds.sampling`), with its own
  devices (CUDA_VISIBLE_DEVICES slices of `tensor_parallel` GPUs) or CPU cores; the shards are
  merged back in prompt order.

Engines run in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, on CPU: ~3 s to start instead of
~30 s). vLLM keeps its parallel state in module globals, so one process holds one engine that
can be shut down safely: when a function given a model directory finds another engine alive in
this process, it runs its own engine in a child process instead.

`logprobs_of` gives teacher-forced log-probs (prompt_logprobs), `reload_weights` swaps new HF
weights into a live engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from aipo_mp.errors import ConfigError
from aipo_mp.rounds.shards import ShardDir, StopFlag, run_shard_task, shard_bounds, shard_count, task_identity
from aipo_mp.runtime.files import atomic_write_text

GIB = 1 << 30
FINISH_REASONS = ("stop", "length")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingSpec:
    n: int = 5  # samples per prompt
    temperature: float = 0.4
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (EOS always stops)
    seed: int = 0
    chat_template: bool = True  # wrap string prompts as one user message (chat prompts always use it)
    tensor_parallel: int = 1  # GPUs (or CPU core groups) per engine
    replicas: int = 1  # data-parallel engines, each in its own process
    kv_cache_gib: float = 1.0  # KV cache on CPU (on GPUs vLLM sizes it from gpu_memory_utilization)
    dtype: Optional[str] = None  # None: float32 on CPU, the checkpoint's dtype ("auto") on GPUs
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9  # GPUs only

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        spec = cls(**values)
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        errors = []
        for name in ("n", "max_tokens", "tensor_parallel", "replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"sampling.{name}={value!r}: must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            errors.append(f"sampling.temperature={self.temperature!r}: must be a number >= 0 (0 is greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            errors.append(f"sampling.top_p={self.top_p!r}: must be in (0, 1]")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            errors.append(f"sampling.stop={self.stop!r}: must be a list of non-empty strings")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            errors.append(f"sampling.seed={self.seed!r}: must be an integer >= 0")
        if not isinstance(self.kv_cache_gib, (int, float)) or self.kv_cache_gib <= 0:
            errors.append(f"sampling.kv_cache_gib={self.kv_cache_gib!r}: must be > 0")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            errors.append(f"sampling.max_model_len={self.max_model_len!r}: must be an integer >= 2 or null")
        if errors:
            raise ConfigError(errors)


def prompt_seed(seed: int, prompt_index: int, n: int) -> int:
    """The sampling seed of prompt `prompt_index`; its samples use this + 0..n-1. A hash rather
    than seed + index so that runs with neighbouring seeds share no sample streams."""
    digest = hashlib.sha256(f"aipo-sampling:{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - n)


# ---------------------------------------------------------------------------------------------
# Prompts and JSONL
# ---------------------------------------------------------------------------------------------

PROMPT_HINT = 'each line needs a JSON object {"id"?: str|int, "prompt": str or [{"role": str, "content": str}, ...]}'


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records {"id", "prompt", ["meta"]} from a local dataset in any format the pairs
    reader accepts (JSONL, .jsonl.gz, Parquet, datasets.save_to_disk; aipo_mp.data.readers). A
    record without an id gets its 0-based line (row) index; other keys are kept under "meta" (a
    rule reward can read them, e.g. a reference answer)."""
    from aipo_mp.data.readers import BadRow, DataFormatError, read_rows

    path = Path(path)
    records, seen = [], {}
    try:
        fmt, rows = read_rows(path, what="prompts file")
        unit = "line" if fmt.startswith("jsonl") else "row"
        for where, index, obj in rows:
            problem = obj.problem if isinstance(obj, BadRow) else prompt_record_problem(obj)
            if problem:
                raise ConfigError(f"{where}: {problem}; {PROMPT_HINT}")
            record = prompt_record(obj, index)
            key = json.dumps(record["id"])
            if key in seen:
                raise ConfigError(f"{where}: prompt id {key} already used on {seen[key]}; give every prompt "
                                  "a unique id (or none: a missing id becomes the line index)")
            seen[key] = f"{unit} {index + 1}"
            records.append(record)
    except DataFormatError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    if not records:
        raise ConfigError(f"prompts file {path} contains no prompts; {PROMPT_HINT}")
    return records


def prompt_record_problem(obj: Any) -> Optional[str]:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
        return f"field 'id' must be a string or an integer, got {json.dumps(obj['id'])}"
    if "prompt" not in obj:
        return "missing field 'prompt'"
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        return None if prompt else "field 'prompt' is an empty string"
    if isinstance(prompt, list):
        if not prompt:
            return "field 'prompt' is an empty message list"
        for k, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                return f"message {k} of field 'prompt' is not a {{role: str, content: str}} object"
        return None
    return f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"


def prompt_record(obj: dict, default_id: int) -> dict:
    """{"id", "prompt", ["meta"]}: keys other than id and prompt go under meta."""
    record = {"id": obj.get("id", default_id), "prompt": obj["prompt"]}
    nested = isinstance(obj.get("meta"), dict)  # an already normalized record
    meta = {**(obj["meta"] if nested else {}),
            **{k: v for k, v in obj.items() if k not in ("id", "prompt") and not (k == "meta" and nested)}}
    if meta:
        record["meta"] = meta
    return record


def normalize_prompts(prompts) -> list[dict]:
    """Accept a path, or prompt dicts as read_prompts returns them (a missing id becomes the
    index; other keys go under meta; ids must be unique)."""
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    out, seen = [], set()
    for index, obj in enumerate(prompts):
        problem = prompt_record_problem(obj)
        if problem:
            raise ConfigError(f"prompt {index}: {problem}")
        record = prompt_record(obj, index)
        key = json.dumps(record["id"])
        if key in seen:
            raise ConfigError(f"prompt {index}: id {key} is used twice; prompt ids must be unique")
        seen.add(key)
        out.append(record)
    if not out:
        raise ConfigError("no prompts to sample from")
    return out


def load_records(source, fields: Sequence[str], what: str, fix: str) -> list[dict]:
    """Records from a JSONL path (or an already loaded list), each a dict holding `fields`."""
    records = read_jsonl(source) if isinstance(source, (str, Path)) else list(source)
    for k, record in enumerate(records):
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise ConfigError(f"{what} {k} lacks field(s) {', '.join(missing)}; {fix}")
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    records = []
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def as_token_list(encoded) -> list[int]:
    """apply_chat_template returns a BatchEncoding in transformers 5, a list in 4.x."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt, chat_template: bool = True, what: str = "prompt") -> tuple[list[int], bool]:
    """(prompt token ids, chat_format) exactly as the trainer tokenizes the pair's prompt."""
    if isinstance(prompt, str) and not (chat_template and has_chat_template(tokenizer)):
        return list(tokenizer(prompt).input_ids), False
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not has_chat_template(tokenizer):
        raise ConfigError(f"{what} is a list of chat messages but the model's tokenizer has no chat template; "
                          "give string prompts or use a tokenizer with a chat_template")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a template that rejects the roles, for instance
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{what}: the tokenizer's chat template failed ({reason}); fix the messages' roles "
                          "or the template") from None
    return as_token_list(ids), True


def training_prompt(record: dict):
    """The prompt as the trainer must see it to reproduce the sampled prompt tokens."""
    prompt = record["prompt"]
    if record.get("chat_format") and isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


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
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{what} directory {model_dir} has no readable config.json; give a Hugging Face "
                          "model directory (export a Megatron checkpoint to HF first)") from None
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


def engine_kwargs(spec: SamplingSpec) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sample(model, prompts, spec: Optional[SamplingSpec] = None, out_path: Optional[str | Path] = None) -> list[dict]:
    """Sample `spec.n` answers per prompt; write them to `out_path` (atomically) and return them.

    `model` is an HF directory (an engine is started and shut down here, in this process or, with
    replicas or another engine alive here, in child processes) or a live vLLM `LLM`."""
    spec = spec or SamplingSpec()
    spec.validate()
    prompts = normalize_prompts(prompts)
    if is_engine(model):
        if spec.replicas > 1:
            raise ConfigError("sampling.replicas > 1 needs a model directory (each replica starts its own engine), "
                              "not a live engine")
        records = generate_records(model, prompts, spec, index_offset=0)
    else:
        check_model_dir(model, "policy model")
        replicas = min(spec.replicas, len(prompts))
        if replicas > 1 or engine_in_use():
            records = sample_in_children(model, prompts, spec, replicas, out_path)
        else:
            llm = start_engine(model, **engine_kwargs(spec), what="policy model")
            try:
                records = generate_records(llm, prompts, spec, index_offset=0)
            finally:
                close_engine(llm)
    if out_path is not None:
        write_jsonl(out_path, records)
    return records


def generate_records(llm, prompts: list[dict], spec: SamplingSpec, index_offset: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    max_len = llm.model_config.max_model_len
    encoded = []
    for record in prompts:
        ids, chat = encode_prompt(tokenizer, record["prompt"], spec.chat_template, f"prompt {record['id']!r}")
        if len(ids) >= max_len:
            raise ConfigError(f"prompt {record['id']!r} has {len(ids)} tokens; the engine's max_model_len is {max_len} "
                              "and leaves no room for an answer; shorten the prompt or raise sampling.max_model_len")
        encoded.append((ids, chat))
    params = [SamplingParams(n=spec.n, temperature=float(spec.temperature), top_p=float(spec.top_p),
                             max_tokens=spec.max_tokens, stop=list(spec.stop) or None,
                             seed=prompt_seed(spec.seed, index_offset + i, spec.n))
              for i in range(len(prompts))]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in encoded], params, use_tqdm=False)
    records = []
    for record, (ids, chat), output in zip(prompts, encoded, outputs):
        for completion in sorted(output.outputs, key=lambda c: c.index):
            if completion.finish_reason not in FINISH_REASONS:
                raise RuntimeError(f"vLLM finished a sample of prompt {record['id']!r} with reason "
                                   f"{completion.finish_reason!r} (expected stop or length)")
            line = {"prompt_id": record["id"], "prompt": record["prompt"], "sample_index": completion.index,
                    "text": completion.text, "num_tokens": len(completion.token_ids),
                    "finish_reason": completion.finish_reason, "chat_format": chat, "num_prompt_tokens": len(ids)}
            if "meta" in record:
                line["meta"] = record["meta"]
            records.append(line)
    return records


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


def run_children(module: str, jobs: list[tuple[list[str], dict]], workdir: Path) -> None:
    """Run `python -m module args` for every (args, env) job in parallel; raise on any failure.
    A child that hit a ConfigError writes it to its `--out` path + '.error' and exits 2."""
    procs = []
    for k, (args, env) in enumerate(jobs):
        log = open(workdir / f"child{k}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log, args))
    failures = []
    for k, (proc, log, args) in enumerate(procs):
        rc = proc.wait()
        log.close()
        if rc == 0:
            continue
        error_file = Path(args[args.index("--out") + 1] + ".error")
        if error_file.exists():
            raise ConfigError(error_file.read_text().strip())
        tail = (workdir / f"child{k}.log").read_text().strip().splitlines()[-25:]
        failures.append(f"{module} child {k} exited with {rc}:\n" + "\n".join(tail))
    if failures:
        raise RuntimeError("\n\n".join(failures))


def sample_in_children(model_dir, prompts: list[dict], spec: SamplingSpec, replicas: int,
                       out_path: Optional[str | Path]) -> list[dict]:
    parent = Path(out_path).parent if out_path is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".aipo_sampling.", dir=parent) as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(spec.to_dict()))
        jobs = []
        for k, (start, end) in enumerate(shard_bounds(len(prompts), replicas)):
            write_jsonl(tmp / f"prompts{k}.jsonl", prompts[start:end])
            args = ["--model", str(model_dir), "--prompts", str(tmp / f"prompts{k}.jsonl"),
                    "--spec", str(tmp / "spec.json"), "--out", str(tmp / f"samples{k}.jsonl"),
                    "--index-offset", str(start)]
            jobs.append((args, replica_env(k, replicas, spec.tensor_parallel)))
        run_children("aipo_mp.rounds.sampling", jobs, tmp)
        records = []
        for k in range(replicas):
            records.extend(read_jsonl(tmp / f"samples{k}.jsonl"))
    return records


def sample_task(model_dir, prompts, spec: SamplingSpec, shard_root: str | Path, stop: StopFlag,
                shard_prompts: int = 0) -> int:
    """One task of a placed sample stage (`aipo-mp sample --shard-dir`): its own engine on its own
    devices, its unfinished shards of the prompts (by SLURM_PROCID / RANK); the driver merges them.
    Returns 0, or 75 when a stop signal left shards undone."""
    rank, world, local_rank, local_world = task_identity()
    prompts = normalize_prompts(prompts)
    shards = ShardDir(shard_root, shard_count(len(prompts), world, shard_prompts))
    bounds = shard_bounds(len(prompts), shards.count)
    llm = None

    def work(start: int, end: int) -> list[dict]:
        nonlocal llm
        if llm is None:
            from aipo_mp.rounds.shards import claim_engine_devices

            claim_engine_devices(local_rank, local_world, spec.tensor_parallel)
            llm = start_engine(model_dir, **engine_kwargs(spec), what="policy model")
        return generate_records(llm, prompts[start:end], spec, index_offset=start)

    try:
        return run_shard_task(shards, bounds, work, stop, rank, world)
    finally:
        if llm is not None:
            close_engine(llm)


# ---------------------------------------------------------------------------------------------
# Teacher-forced log-probs and weight reloading
# ---------------------------------------------------------------------------------------------


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
        raise ConfigError(f"{hf_dir} holds no *.safetensors files; reload_weights needs an HF safetensors directory")
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(hf_dir)})
    llm.reset_prefix_cache()


# ---------------------------------------------------------------------------------------------
# Child-process entry (one replica's shard)
# ---------------------------------------------------------------------------------------------


def pin_to_assigned_cores() -> None:
    cores = os.environ.get("AIPO_CPU_CORES")
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except OSError:
            pass


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Sample one shard of prompts (a replica of aipo_mp sampling).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL of prompt records (id, prompt[, meta])")
    parser.add_argument("--spec", required=True, help="JSON file of SamplingSpec fields")
    parser.add_argument("--out", required=True)
    parser.add_argument("--index-offset", type=int, default=0, help="position of the shard's first prompt")
    args = parser.parse_args(argv)
    pin_to_assigned_cores()
    try:
        spec = SamplingSpec.from_dict(json.loads(Path(args.spec).read_text()))
        prompts = read_jsonl(args.prompts)
        llm = start_engine(args.model, **engine_kwargs(spec), what="policy model")
        try:
            records = generate_records(llm, prompts, spec, index_offset=args.index_offset)
        finally:
            close_engine(llm)
    except ConfigError as e:
        atomic_write_text(args.out + ".error", str(e) + "\n")
        return 2
    write_jsonl(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
