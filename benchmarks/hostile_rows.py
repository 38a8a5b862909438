"""Peak memory of `aipo-mp train` (one rank) on a pairs file with one huge row versus the same
file without it: the row is cut by characters before tokenizing (aipo_mp.data.prepare), so the
peak must stay within 1.5x.

    python benchmarks/hostile_rows.py [--row-mb 50] [--field prompt] [--work DIR] [--check 1.5]

Builds the tiny llama and its tokenizer locally, trains 1 step on each file in a child process
and reads the child's peak RSS from the kernel (wait4). Prints one JSON object; with --check,
exits 1 when the ratio is above it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny_llama.yaml"


def huge_text(n_bytes: int, seed: int) -> str:
    """Words of the tiny tokenizer's language, `n_bytes` long (ASCII: one byte a character)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "yes", "no", "42"]
    piece = " ".join(rng.choice(words) for _ in range(20000)) + " "
    return (piece * (n_bytes // len(piece) + 1))[:n_bytes]


def write_files(work: Path, row_mb: float, field: str) -> tuple[Path, Path]:
    from aipo_mp.testing.synthetic import marker_pairs

    rows = marker_pairs(16, seed=1)
    plain, hostile = work / "pairs.jsonl", work / "pairs_huge_row.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    big = dict(rows[0])
    big[field] = huge_text(int(row_mb * 2**20), 0) + (" yes" if field == "chosen" else "")
    hostile.write_text(plain.read_text() + json.dumps(big) + "\n")
    return plain, hostile


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, int, str]:
    """(peak RSS in MiB, seconds, exit code, output tail) of a child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        tail = out.read().decode(errors="replace")[-2000:]
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, os.waitstatus_to_exitcode(status), tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row-mb", type=float, default=50.0)
    ap.add_argument("--field", choices=("prompt", "chosen"), default="prompt")
    ap.add_argument("--work", default=None)
    ap.add_argument("--check", type=float, default=None, help="exit 1 when peak(huge) / peak(plain) exceeds this")
    args = ap.parse_args()
    from aipo_mp.config import load_config
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="hostile_rows."))
    tok = build_tiny_tokenizer(work / "tok", vocab_size=512)
    model = save_hf_model(load_config(TINY).model.arch, work / "llama", seed=3, tokenizer_dir=tok)
    plain, hostile = write_files(work, args.row_mb, args.field)
    result = {"row_mb": args.row_mb, "field": args.field}
    for name, data in (("plain", plain), ("huge_row", hostile)):
        cmd = [sys.executable, "-m", "aipo_mp.cli", "train", str(TINY), f"model.path={model}", f"data.train={data}",
               "train.steps=1", "train.global_batch_pairs=4", "train.seq_length=128", "output.tensorboard=false",
               f"output.dir={work / ('run_' + name)}"]
        peak, secs, code, tail = peak_rss_mb(cmd)
        if code != 0:
            print(tail, file=sys.stderr)
            raise SystemExit(f"train on {data} exited {code}")
        result[name] = {"peak_rss_mb": round(peak, 1), "seconds": round(secs, 1)}
    result["ratio"] = round(result["huge_row"]["peak_rss_mb"] / result["plain"]["peak_rss_mb"], 3)
    print(json.dumps(result))
    return 1 if args.check and result["ratio"] > args.check else 0


if __name__ == "__main__":
    sys.exit(main())
