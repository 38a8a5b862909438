"""Near-duplicate removal speed (aipo_mp.rounds.synthesize.remove_near_duplicates, exact ROUGE-L
with a prefix filter) on synthetic instructions: words from a Zipf-distributed vocabulary, 5-30
words each, a share of them near-copies (one word changed) of earlier ones.

    python benchmarks/near_duplicates.py [--n 100000] [--threshold 0.7]
"""

from __future__ import annotations

import argparse
import random
import time

from aipo_mp.rounds.synthesize import remove_near_duplicates


def synthetic_instructions(n: int, copies: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(5000)]
    weights = [1.0 / (k + 1) for k in range(len(vocab))]  # Zipf: a few words are very common
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < copies:
            words = rng.choice(out).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
        else:
            words = rng.choices(vocab, weights, k=rng.randint(5, 30))
        out.append(" ".join(words))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100000)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--copies", type=float, default=0.1)
    args = parser.parse_args()
    texts = synthetic_instructions(args.n, args.copies)
    start = time.perf_counter()
    kept = remove_near_duplicates(texts, args.threshold)
    took = time.perf_counter() - start
    print(f"{args.n} instructions, threshold {args.threshold}: kept {len(kept)} in {took:.1f} s "
          f"({args.n / took:.0f} per s)")


if __name__ == "__main__":
    main()
