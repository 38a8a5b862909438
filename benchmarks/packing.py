"""Token utilization of packed rows versus padding every sequence to the row length, on a
chat-like length distribution (prompts lognormal with median 60 tokens, responses lognormal with
median 150, each clipped to 512; see aipo_mp.data.pairs.synthetic_chat_lengths).

    python benchmarks/packing.py [--pairs 3000] [--seq-length 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

from aipo_mp.data.pairs import pack_pairs, packed_utilization, padded_utilization, synthetic_chat_pairs


def batch_max_utilization(pairs, pairs_per_batch: int) -> float:
    """The usual padded layout: each micro-batch of `pairs_per_batch` pairs (2 sequences each)
    is padded to its own longest sequence."""
    real = computed = 0
    for i in range(0, len(pairs), pairs_per_batch):
        batch = pairs[i:i + pairs_per_batch]
        lengths = [len(p.prompt) + len(r) for p in batch for r in (p.chosen, p.rejected)]
        real += sum(lengths)
        computed += len(lengths) * max(lengths)
    return real / computed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--max-pairs-per-row", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs = synthetic_chat_pairs(args.pairs, seed=args.seed)
    t0 = time.perf_counter()
    rows = pack_pairs(pairs, args.seq_length, args.max_pairs_per_row)
    seconds = time.perf_counter() - t0
    result = {
        "pairs": args.pairs, "seq_length": args.seq_length,
        "packed_utilization": round(packed_utilization(rows), 4), "packed_rows": len(rows),
        "padded_utilization": round(padded_utilization(pairs, args.seq_length), 4), "padded_rows": 2 * len(pairs),
        "pack_seconds": round(seconds, 3),
        "padded_to_batch_max_utilization_4_pairs": round(batch_max_utilization(pairs, 4), 4),
    }
    print(f"packed: {result['packed_utilization']:.4f} of computed tokens are real ({len(rows)} rows); "
          f"padded to seq_length: {result['padded_utilization']:.4f} ({2 * len(pairs)} rows); padded to the "
          f"longest of each 4-pair batch: {result['padded_to_batch_max_utilization_4_pairs']:.4f}; "
          f"packing took {seconds:.2f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
