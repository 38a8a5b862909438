"""Score sampled answers: the second stage of a round. Writes `scored.jsonl` = samples + "score".

Two kinds of reward:

* a rule, `score_with_rule(samples, "package.module:function")` (or "path/to/file.py:function",
  or a callable): `function(prompt, response) -> float`, with `prompt` as given in the prompts
  file (a string or a list of messages). A function that also takes a `meta` argument gets the
  prompt record's extra fields (e.g. a reference answer).
* a reward model, `score_with_model(samples, reward_dir)`: a `*ForSequenceClassification` HF
  checkpoint with `num_labels == 1`, run by vLLM's pooling runner; the score is the raw head
  output (no sigmoid). What the reward model reads:
    - a chat sample (a message-list prompt, or a string prompt sampled through the policy's chat
      template, `chat_format: true`) is rendered with the reward tokenizer's chat template as
      messages + {"role": "assistant", "content": response}, when that tokenizer has a template;
    - otherwise plain concatenation: a string prompt + response, tokenized with the reward
      tokenizer's own special tokens (BOS); a message list becomes "role: content\\n" lines
      followed by "assistant: " + response.

A score that is NaN, infinite or beyond +-MAX_ABS_SCORE (where sums, means and gaps overflow), or
a rule that raises or stops the process (any exception, SystemExit, KeyboardInterrupt), is a
ConfigError naming the rule, the prompt id and sample index: a silently bad reward would train the
policy on noise, and a rule that exits would leave the stage without output.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, Optional

from aipo_mp.data.records import load_records, read_jsonl, write_jsonl
from aipo_mp.errors import ConfigError, UserError
from aipo_mp.rounds.engines import check_model_dir, close_engine, engine_in_use, is_engine, run_children, start_engine
from aipo_mp.runtime.files import atomic_write_text
from aipo_mp.tokenization import as_token_list, has_chat_template

SAMPLE_FIELDS = ("prompt_id", "prompt", "sample_index", "text")
# Larger scores overflow what is computed from them (a mean over samples, a chosen - rejected gap,
# float32 statistics): 1e308 + 1e308 is inf. Real rewards are many orders of magnitude smaller.
MAX_ABS_SCORE = 1e30


def load_samples(samples) -> list[dict]:
    return load_records(samples, SAMPLE_FIELDS, "sample", "score the samples.jsonl that aipo_mp.rounds.sampling wrote")


def where(record: dict) -> str:
    return f"prompt_id={json.dumps(record['prompt_id'])} sample_index={record['sample_index']}"


def finite_score(value, record: dict, source: str, fix: str) -> float:
    """A score is a finite real number, not a bool or a numeric string: the same rule the pairs
    stage applies to scored.jsonl, so whatever the reward stage writes the pairs stage accepts."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{source} returned {value!r} (not a number) for {where(record)}; {fix}")
    try:
        score = float(value)
    except OverflowError:  # an int too large for a float
        score = math.inf if value > 0 else -math.inf
    if not math.isfinite(score):
        raise ConfigError(f"{source} returned a non-finite score ({score}) for {where(record)}; {fix}")
    if abs(score) > MAX_ABS_SCORE:
        raise ConfigError(f"{source} returned {score:g} for {where(record)}, beyond +-{MAX_ABS_SCORE:g} (means and "
                          f"gaps of such scores overflow); {fix}, e.g. scale it down")
    return score


# ---------------------------------------------------------------------------------------------
# Rule rewards
# ---------------------------------------------------------------------------------------------


def load_rule(rule: str) -> Callable:
    if not isinstance(rule, str) or rule.count(":") != 1 or not all(rule.split(":")):
        raise ConfigError(f"reward rule {rule!r} must look like 'package.module:function' or 'path/file.py:function'")
    module_name, function_name = rule.split(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            spec = importlib.util.spec_from_file_location(f"aipo_reward_rule_{path.stem}", path)
            if spec is None or not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except BaseException as e:  # noqa: BLE001 - user code: an exit while importing it is its failure too
        raise ConfigError(f"reward rule {rule!r}: cannot import {module_name} ({rule_failure(e)})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward rule {rule!r}: {module_name} has no function {function_name}")
    return function


def check_rule(rule: str) -> list[str]:
    """Import the rule and check it can be called as rule(prompt, response): `aipo-mp run` calls
    this before any stage, so a typo does not surface only after sampling."""
    try:
        function = load_rule(rule)
    except UserError as e:
        return e.errors
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []  # a builtin without a signature: trust it
    try:
        signature.bind("prompt", "response")
    except TypeError as e:
        return [f"reward rule {rule!r} cannot be called as {function.__name__}(prompt, response) ({e}); it must take "
                "the prompt and the response text (and optionally meta=)"]
    return []


def takes_meta(function: Callable) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "meta" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def rule_failure(e: BaseException) -> str:
    """How user code stopped: an exception, or an attempt to end the process."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r}) (a reward rule must return a score, never exit)"
    if isinstance(e, KeyboardInterrupt):
        return "was interrupted (KeyboardInterrupt)"
    text = (str(e).strip().splitlines() or [""])[0]
    return f"raised {type(e).__name__}" + (f": {text}" if text else "")


def score_with_rule(samples, rule: str | Callable, out_path: Optional[str | Path] = None) -> list[dict]:
    """Score every sample with `rule(prompt, response)`; write `out_path` atomically when given."""
    records = load_samples(samples)
    function = rule if callable(rule) else load_rule(rule)
    name = getattr(function, "__qualname__", repr(function)) if callable(rule) else rule
    pass_meta = takes_meta(function)
    fix = "make the rule return a finite float for every response"
    scored = []
    for record in records:
        try:
            if pass_meta:
                value = function(record["prompt"], record["text"], meta=record.get("meta", {}))
            else:
                value = function(record["prompt"], record["text"])
        except BaseException as e:  # noqa: BLE001 - user code: SystemExit/KeyboardInterrupt in it end the stage too
            raise ConfigError(f"reward rule {name} {rule_failure(e)} on {where(record)}; {fix}") from None
        scored.append({**record, "score": finite_score(value, record, f"reward rule {name}", fix)})
    if out_path is not None:
        write_jsonl(out_path, scored)
    return scored


# ---------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------


def check_reward_model(model_dir: str | Path) -> dict:
    """config.json of a one-label sequence classifier, else ConfigError."""
    config = check_model_dir(model_dir, "reward model")
    architectures = config.get("architectures") or []
    num_labels = config.get("num_labels")
    if num_labels is None:  # transformers 5 stores only id2label; transformers' default is 2 labels
        num_labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else 2
    if not (architectures and all(a.endswith("ForSequenceClassification") for a in architectures)) or num_labels != 1:
        raise ConfigError(f"reward model {model_dir} is not a one-label sequence classifier "
                          f"(architectures={architectures}, num_labels={num_labels}); give a "
                          "*ForSequenceClassification checkpoint with num_labels=1 (a scalar reward head)")
    return config


def plain_prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def reward_input_ids(record: dict, tokenizer) -> list[int]:
    """The tokens the reward model scores for one sample (see the module docstring)."""
    prompt, response = record["prompt"], record["text"]
    chat = isinstance(prompt, list) or bool(record.get("chat_format"))
    if chat and has_chat_template(tokenizer):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        messages = [*messages, {"role": "assistant", "content": response}]
        try:
            return as_token_list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"the reward tokenizer's chat template failed on {where(record)} ({reason})") from None
    return list(tokenizer(plain_prompt_text(prompt) + response).input_ids)


def score_with_model(samples, model, out_path: Optional[str | Path] = None, **engine_options) -> list[dict]:
    """Score every sample with a reward model: an HF directory (an engine is started here, or in a
    child process when another engine is alive in this process) or a live pooling `LLM`.
    `engine_options` go to `sampling.start_engine` (tensor_parallel, dtype, kv_cache_gib, ...)."""
    records = load_samples(samples)
    if is_engine(model):
        if model.model_config.runner_type != "pooling":
            raise ConfigError("the reward engine must be started with runner='pooling' "
                              "(start_engine(dir, runner='pooling'))")
        scores = _classify(model, records, "the reward model")
    else:
        check_reward_model(model)
        if engine_in_use():
            scores = _score_in_child(model, records, engine_options)
        else:
            llm = start_engine(model, runner="pooling", what="reward model", **engine_options)
            try:
                scores = _classify(llm, records, f"reward model {model}")
            finally:
                close_engine(llm)
    scored = [{**record, "score": score} for record, score in zip(records, scores)]
    if out_path is not None:
        write_jsonl(out_path, scored)
    return scored


def _classify(llm, records: list[dict], name: str) -> list[float]:
    from vllm import PoolingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    max_len = llm.model_config.max_model_len
    prompts = []
    for record in records:
        ids = reward_input_ids(record, tokenizer)
        if len(ids) > max_len:
            raise ConfigError(f"{where(record)}: prompt + response is {len(ids)} tokens, more than {name}'s "
                              f"max_model_len {max_len}; lower sampling.max_tokens or use a longer-context "
                              "reward model")
        prompts.append(TokensPrompt(prompt_token_ids=ids))
    if not prompts:
        return []
    outputs = llm.classify(prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    fix = "check the reward model's weights and dtype (fp16 overflow?) or the sample's text"
    scores = []
    for record, output in zip(records, outputs):
        probs = output.outputs.probs
        if len(probs) != 1:
            raise ConfigError(f"{name} returned {len(probs)} values per text; a reward model needs num_labels=1")
        scores.append(finite_score(probs[0], record, name, fix))
    return scores


def _score_in_child(model_dir, records: list[dict], engine_options: dict) -> list[float]:
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".aipo_rewards.") as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "samples.jsonl", records)
        (tmp / "options.json").write_text(json.dumps(engine_options))
        args = ["--model", str(model_dir), "--samples", str(tmp / "samples.jsonl"),
                "--options", str(tmp / "options.json"), "--out", str(tmp / "scored.jsonl")]
        run_children("aipo_mp.rounds.rewards", [(args, dict(os.environ))], tmp)
        return [r["score"] for r in read_jsonl(tmp / "scored.jsonl")]


def reward_task(samples, shard_root: str | Path, stop, rule: Optional[str] = None, model: Optional[str] = None,
                **engine_options) -> int:
    """One engine task of a placed reward stage (`aipo-mp reward --shard-dir`): score this
    engine's unfinished shards of the samples with the rule or its own reward engine (started at
    its first shard, kept for the rest); the driver merges the shards. Returns 0, or 75 when a stop
    signal came before its shards were scored."""
    from aipo_mp.rounds.engines import engine_task, serve_headless
    from aipo_mp.rounds.shards import (
        ShardDir,
        claim_head_devices,
        engine_todo,
        run_shard_task,
        shard_bounds,
        shard_count,
    )

    task = engine_task()
    records = load_samples(samples)
    shards = ShardDir(shard_root, shard_count(len(records), task.engines))
    if not task.is_head:  # a spanning reward engine's other nodes: its headless part
        return serve_headless(task, finished=lambda: not engine_todo(shards, task.engine, task.engines))
    llm = None

    def work(start: int, end: int) -> list[dict]:
        nonlocal llm
        if rule:
            return score_with_rule(records[start:end], rule)
        if llm is None:
            check_reward_model(model)
            claim_head_devices(task, engine_options.get("tensor_parallel", 1) * engine_options.get("pipeline_parallel", 1))
            llm = start_engine(model, runner="pooling", what="reward model", task=task, **engine_options)
        return score_with_model(records[start:end], llm)

    try:
        return run_shard_task(shards, shard_bounds(len(records), shards.count), work, stop, task.engine, task.engines)
    finally:
        if llm is not None:
            close_engine(llm)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Score samples with a reward model (a child of aipo_mp rewards).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--options", required=True, help="JSON file of start_engine options")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        score_with_model(args.samples, args.model, args.out, **json.loads(Path(args.options).read_text()))
    except UserError as e:
        atomic_write_text(args.out + ".error", str(e) + "\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
