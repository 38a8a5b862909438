"""`make demo`: the main job on the tiny built-in default, on CPU.

Builds once (cached under .cache/demo) a sentencepiece tokenizer, a tiny Llama briefly
fine-tuned on the synthetic task of aipo_mp/demo_task.py, and its prompts; then runs 3 AIPO
rounds (vLLM sampling, the rule reward, pairs, megatron-core training on two gloo ranks) with
`aipo-mp run configs/recipes/aipo_tiny.yaml`, and prints the per-round table and plot paths.

`python -m aipo_mp.demo --selfinstruct` runs the second tiny recipe instead,
`configs/recipes/aipo_tiny_selfinstruct.yaml`: a self-instruct stage each round and a tiny
pairwise ranker (taught the colour rule once, cached) in place of the rule reward."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "demo"
RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny.yaml"
SELFINSTRUCT_RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny_selfinstruct.yaml"


def build_assets(cache: Path = CACHE) -> dict:
    """Tokenizer, pre-trained tiny policy and prompts; each rebuilt only when missing."""
    from aipo_mp.config import load_config
    from aipo_mp.demo import task as demo_task
    from aipo_mp.runtime.files import atomic_directory
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(cache / "tokenizer", vocab_size=512)
    policy = cache / "policy"
    if not (policy / "aipo_pretrained.json").exists():
        print("building the tiny starting policy (one-time, about a minute)...", flush=True)
        arch = load_config(ROOT / "configs" / "models" / "tiny_llama.yaml").model.arch
        raw = save_hf_model(arch, cache / "random_init", seed=0, tokenizer_dir=tok)
        with atomic_directory(policy, overwrite=True) as tmp:
            shutil.copytree(raw, tmp, dirs_exist_ok=True)
            demo_task.pretrain(tmp)
            (tmp / "aipo_pretrained.json").write_text(json.dumps({"task": "colors", "steps": 150}))
    prompts = cache / "prompts.jsonl"
    if not prompts.exists():
        demo_task.write_prompts(prompts, n=128, seed=0)
    return {"policy": policy, "prompts": prompts, "tokenizer": tok}


def build_pairwise_ranker(tokenizer: Path, cache: Path = CACHE) -> Path:
    """A tiny pairwise classifier taught the colour rule (aipo_mp/demo_task.py), built once."""
    from aipo_mp.config import load_config
    from aipo_mp.demo import task as demo_task
    from aipo_mp.runtime.files import atomic_directory
    from aipo_mp.testing.tiny import build_tiny_classifier

    ranker = cache / "pairwise_ranker"
    if not (ranker / "aipo_pretrained.json").exists():
        print("building the tiny pairwise ranker (one-time, about a minute)...", flush=True)
        template = load_config(SELFINSTRUCT_RECIPE).reward.template
        raw = build_tiny_classifier(cache / "ranker_init", tokenizer, seed=0)
        with atomic_directory(ranker, overwrite=True) as tmp:
            shutil.copytree(raw, tmp, dirs_exist_ok=True)
            demo_task.train_pairwise_ranker(tmp, template)
            (tmp / "aipo_pretrained.json").write_text(json.dumps({"task": "colors", "kind": "pairwise"}))
    return ranker


def main(argv: list[str] | None = None) -> int:
    from aipo_mp.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    assets = build_assets()
    selfinstruct = "--selfinstruct" in argv
    run_dir = ROOT / "runs" / ("demo_selfinstruct" if selfinstruct else "demo")
    if "--resume" not in argv:
        shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [a for a in argv if "=" in a]
    if selfinstruct:
        overrides = [f"reward.model={build_pairwise_ranker(assets['tokenizer'])}", *overrides]
    try:
        cli_main(["run", str(SELFINSTRUCT_RECIPE if selfinstruct else RECIPE), f"model.path={assets['policy']}",
                  f"rounds.prompts={assets['prompts']}", f"output.dir={run_dir}", *overrides])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
