"""`make demo`: the main job on the tiny built-in default, on CPU.

Builds once (cached under .cache/demo) a sentencepiece tokenizer, a tiny Llama and a synthetic
preference set, trains with AIPO on two gloo ranks (TP=2, sequence parallel) with megatron-core,
and prints the per-step metrics."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "demo"


def build_assets() -> dict:
    from aipo_mp.config import load_config
    from aipo_mp.models.hf_build import save_hf_model
    from aipo_mp.synthetic import marker_pairs, write_jsonl
    from aipo_mp.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(CACHE / "tokenizer", vocab_size=512)
    arch = load_config(ROOT / "configs" / "models" / "tiny_llama.yaml").model.arch
    model = save_hf_model(arch, CACHE / "tiny_llama", seed=0, tokenizer_dir=tok)
    pairs = CACHE / "pairs.jsonl"
    if not pairs.exists():
        write_jsonl(marker_pairs(512, seed=0), pairs)
    return {"model": model, "pairs": pairs}


def main() -> int:
    from aipo_mp.cli import main as cli_main

    assets = build_assets()
    run_dir = ROOT / "runs" / "demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["train", str(ROOT / "configs" / "recipes" / "demo_train.yaml"), "--nproc-per-node", "2",
            f"model.path={assets['model']}", f"data.train={assets['pairs']}", f"output.dir={run_dir}"]
    try:
        cli_main(argv)
    except SystemExit as e:
        if e.code:
            return int(e.code)
    print_table(run_dir / "metrics.jsonl")
    return 0


def print_table(path: Path) -> None:
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    cols = ["step", "loss", "rewards/accuracy", "rewards/margin", "agreement", "grad_norm", "tokens_per_s"]
    print("\n" + "  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>16.4f}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in cols))
    print(f"\nmetrics: {path}\ncheckpoint: {path.parent / 'checkpoints'}")


if __name__ == "__main__":
    sys.exit(main())
