"""One task of an engine stage for the multi-node engine tests (tests/e2e/test_engines_multinode.py),
run through the real launchers: the product's `engine_task()` decides what it does. The head of
an engine (or a task of a one-node engine) starts the engine with `start_engine(..., task=...)`
and writes teacher-forced log-probs of fixed token lists (`logprobs_of`, as the KL stage uses it)
and, with --prompts, the sample records of those prompts (`generate_records`, as the sample stage
uses it); a headless task serves its part with `serve_headless` until the head ends.

    python -m tests.engine_task_worker --model DIR --tokens T.json --out OUT.json [--prompts P.jsonl]
        [sampling.tensor_parallel=2 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True, help="JSON list of token-id lists")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from aipo_mp.config import load_config
    from aipo_mp.data.records import normalize_prompts
    from aipo_mp.rounds.engines import (
        close_engine,
        engine_kwargs,
        engine_task,
        logprobs_of,
        serve_headless,
        start_engine,
    )
    from aipo_mp.rounds.sampling import generate_records
    from aipo_mp.runtime.files import atomic_write_text

    spec = load_config(None, args.overrides).sampling
    task = engine_task()
    if not task.is_head:
        return serve_headless(task)
    llm = start_engine(args.model, **engine_kwargs(spec), task=task)
    try:
        result = {"task": task.__dict__, "logprobs": logprobs_of(llm, json.loads(Path(args.tokens).read_text()))}
        if args.prompts:
            result["samples"] = generate_records(llm, normalize_prompts(args.prompts), spec, 0)
    finally:
        close_engine(llm)
    atomic_write_text(args.out, json.dumps(result))
    return 0


if __name__ == "__main__":  # vLLM's workers may re-import the main module
    sys.exit(main())
