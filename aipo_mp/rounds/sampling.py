"""Sample answers from the policy with vLLM: the first stage of a round.

`sample(model, prompts, spec, out_path)` writes `samples.jsonl`, one line per (prompt, sample):

    {"prompt_id", "prompt" (as given), "sample_index", "text", "num_tokens", "finish_reason",
     "chat_format", "num_prompt_tokens", ["meta"]}

* `num_tokens` counts the generated tokens, EOS included when the answer stopped on it;
  `finish_reason` is "stop" (EOS or a stop string) or "length" (cut by `max_tokens` or the
  model's context length).
* Prompt rendering follows the trainer's tokenization contract (`aipo_mp.tokenization`) so the pairs
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

Engines themselves (start, close, CPU binding, teacher-forced log-probs, weight reload) are in
aipo_mp/rounds/engines.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

from aipo_mp.config import SamplingConfig, build_section, check_section
from aipo_mp.data.records import normalize_prompts, read_jsonl, write_jsonl
from aipo_mp.errors import ConfigError, UserError
from aipo_mp.rounds.engines import (
    EngineTask,
    check_model_dir,
    close_engine,
    engine_in_use,
    engine_kwargs,
    engine_task,
    is_engine,
    pin_to_assigned_cores,
    replica_env,
    run_children,
    serve_headless,
    start_engine,
)
from aipo_mp.rounds.shards import ShardDir, StopFlag, run_shard_task, shard_bounds, shard_count, task_identity
from aipo_mp.runtime.files import atomic_write_text
from aipo_mp.tokenization import encode_prompt

FINISH_REASONS = ("stop", "length")


def prompt_seed(seed: int, prompt_index: int, n: int) -> int:
    """The sampling seed of prompt `prompt_index`; its samples use this + 0..n-1. A hash rather
    than seed + index so that runs with neighbouring seeds share no sample streams."""
    digest = hashlib.sha256(f"aipo-sampling:{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - n)


# ---------------------------------------------------------------------------------------------
# Prompts and JSONL
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sample(model, prompts, spec: Optional[SamplingConfig] = None, out_path: Optional[str | Path] = None) -> list[dict]:
    """Sample `spec.n` answers per prompt; write them to `out_path` (atomically) and return them.

    `model` is an HF directory (an engine is started and shut down here, in this process or, with
    replicas or another engine alive here, in child processes) or a live vLLM `LLM`."""
    spec = spec or SamplingConfig()
    check_section(spec, "sampling.")
    prompts = normalize_prompts(prompts)
    if is_engine(model):
        if spec.replicas > 1:
            raise ConfigError("sampling.replicas > 1 needs a model directory (each replica starts its own engine), "
                              "not a live engine")
        records = generate_records(model, prompts, spec, index_offset=0)
    else:
        check_model_dir(model, "policy model")
        check_prompt_lengths(model, prompts, spec)  # before any engine starts
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


def engine_max_len(model_dir, spec: SamplingConfig) -> Optional[int]:
    """The engine's max_model_len: sampling.max_model_len, else the model's max_position_embeddings."""
    if spec.max_model_len:
        return spec.max_model_len
    from aipo_mp.models import read_hf_config

    value = read_hf_config(str(model_dir)).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def prompt_chars(prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def check_prompt_lengths(model_dir, prompts: list[dict], spec: SamplingConfig) -> None:
    """Refuse a prompt that leaves no room for an answer in the engine's max_model_len while the
    prompts are read, before an engine starts (an engine costs minutes and GBs to start). A prompt
    longer than max_model_len x the longest vocabulary entry in characters is refused without
    being tokenized (it cannot have fewer tokens), so a hostile 50 MB prompt costs nothing; the
    others are tokenized as the engine will tokenize them (the engine tokenizes them again)."""
    from aipo_mp.convert.hf_io import load_tokenizer
    from aipo_mp.data.prepare import max_chars_per_token

    max_len = engine_max_len(model_dir, spec)
    if max_len is None:
        return
    tokenizer = load_tokenizer(model_dir, what="policy model")
    most_chars = max_len * max_chars_per_token(tokenizer)
    fix = "shorten the prompt or raise sampling.max_model_len"
    for record in prompts:
        chars = prompt_chars(record["prompt"])
        if chars > most_chars:
            raise ConfigError(f"prompt {record['id']!r} has {chars} characters, more than {max_len} tokens of this "
                              f"tokenizer can hold; the engine's max_model_len is {max_len} and leaves no room for an "
                              f"answer; {fix}")
        ids, _ = encode_prompt(tokenizer, record["prompt"], spec.chat_template, f"prompt {record['id']!r}")
        if len(ids) >= max_len:
            raise ConfigError(f"prompt {record['id']!r} has {len(ids)} tokens; the engine's max_model_len is {max_len} "
                              f"and leaves no room for an answer; {fix}")


def generate_records(llm, prompts: list[dict], spec: SamplingConfig, index_offset: int) -> list[dict]:
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


def sample_in_children(model_dir, prompts: list[dict], spec: SamplingConfig, replicas: int,
                       out_path: Optional[str | Path]) -> list[dict]:
    parent = Path(out_path).parent if out_path is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".aipo_sampling.", dir=parent) as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
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


def sample_task(model_dir, prompts, spec: SamplingConfig, shard_root: str | Path, stop: StopFlag,
                shard_prompts: int = 0) -> int:
    """One task of a placed sample stage (`aipo-mp sample --shard-dir`). Shards are per engine:
    the engine's head task (node-rank 0) starts the engine on its devices (on every node of an
    engine that spans nodes) and samples the engine's unfinished shards of the prompts; the
    engine's other tasks serve its headless part until the head ends. The driver merges the
    shards. Returns 0, or 75 when a stop signal left shards undone."""
    _, _, local_rank, local_world = task_identity()
    task = engine_task()
    prompts = normalize_prompts(prompts)
    shards = ShardDir(shard_root, shard_count(len(prompts), task.engines, shard_prompts))
    if not task.is_head:
        return serve_headless(task, finished=lambda: not engine_todo(shards, task))
    check_prompt_lengths(model_dir, prompts, spec)  # before this task's engine starts
    bounds = shard_bounds(len(prompts), shards.count)
    llm = None

    def work(start: int, end: int) -> list[dict]:
        nonlocal llm
        if llm is None:
            if not task.spans:  # a task of a node shared with other engines: its slice of the node
                from aipo_mp.rounds.shards import claim_engine_devices

                claim_engine_devices(local_rank, local_world, spec.tensor_parallel * spec.pipeline_parallel
                                     * spec.data_parallel)
            llm = start_engine(model_dir, **engine_kwargs(spec), what="policy model", task=task)
        return generate_records(llm, prompts[start:end], spec, index_offset=start)

    try:
        return run_shard_task(shards, bounds, work, stop, task.engine, task.engines)
    finally:
        if llm is not None:
            close_engine(llm)


def engine_todo(shards: ShardDir, task: EngineTask) -> list[int]:
    """The unfinished shards of `task`'s engine (every engines-th of the driver's plan)."""
    return [k for k in shards.planned()[task.engine::task.engines] if not shards.done(k)]


# ---------------------------------------------------------------------------------------------
# Teacher-forced log-probs and weight reloading
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Child-process entry (one replica's shard)
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Sample one shard of prompts (a replica of aipo_mp sampling).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL of prompt records (id, prompt[, meta])")
    parser.add_argument("--spec", required=True, help="JSON file of SamplingConfig fields")
    parser.add_argument("--out", required=True)
    parser.add_argument("--index-offset", type=int, default=0, help="position of the shard's first prompt")
    args = parser.parse_args(argv)
    pin_to_assigned_cores()
    try:
        spec = build_section(SamplingConfig, json.loads(Path(args.spec).read_text()), "sampling.")
        prompts = read_jsonl(args.prompts)
        llm = start_engine(args.model, **engine_kwargs(spec), what="policy model")
        try:
            records = generate_records(llm, prompts, spec, index_offset=args.index_offset)
        finally:
            close_engine(llm)
    except UserError as e:
        atomic_write_text(args.out + ".error", str(e) + "\n")
        return 2
    write_jsonl(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
