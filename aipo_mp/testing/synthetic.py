"""Synthetic preference data for tests, benchmarks and the demo: tasks whose quality a rule can
score, so learning is visible on a tiny model in minutes."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud green quick silver maple ocean tiger lamp forest paper music "
         "orange window garden yellow purple bridge candle rocket winter summer").split()


def marker_pairs(n: int, seed: int = 0, marker: str = "yes", other: str = "no") -> list[dict]:
    """Easy preference: both answers share a random body; the chosen one ends with `marker`,
    the rejected one with `other`. A trained policy should prefer the marker almost always."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = "Question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "?"
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        if rng.random() < 0.5:
            prompt = [{"role": "user", "content": prompt}]
        out.append({"id": i, "prompt": prompt, "chosen": f"{body} {marker}", "rejected": f"{body} {other}"})
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    from aipo_mp.runtime.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)
