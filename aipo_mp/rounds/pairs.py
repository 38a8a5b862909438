"""Turn scored samples into preference pairs: the third stage of a round.

`build_pairs(scored, ...)` groups the samples by prompt (in the order prompts first appear) and,
per prompt, keeps the usable samples: answers cut by the length limit (`finish_reason ==
"length"`) are left out unless `allow_truncated` (the trainer appends EOS to every response, so a
cut answer would be taught as a finished one), and samples with the same text are counted once
(the first one). Then:

* mode "best_worst": one pair, chosen = the highest score, rejected = the lowest (ties: the
  lower sample index). Pairs follow prompt order.
* mode "ranked": several pairs per prompt, every (higher, lower) combination of usable samples
  whose gap passes, at most `max_pairs_per_prompt` per prompt (the largest gaps), and the whole
  file is ordered easy to hard: largest gap first (a curriculum; ties keep prompt order).

A pair is kept only when its gap (chosen_score - rejected_score) is > 0 and >= `min_gap`: with a
tie the two answers carry no preference. A prompt yields no pair for one reason, counted in
`dropped` (the first that applies):
    too_few_samples  fewer than 2 samples
    truncated        fewer than 2 samples left once the length-cut ones are removed
    identical_texts  the usable samples all have the same text
    small_gap        best - worst score is 0 or below min_gap
    small_rank_gap   no pair's rank gap (rejected rank - chosen rank, ranks written by a ranker)
                     reaches min_rank_gap

Outputs (atomically, when `out_dir` is given): `pairs.jsonl` with prompt, chosen, rejected,
chosen_score, rejected_score, prompt_id (+ gap, chosen_tokens, rejected_tokens, sample indices),
in the trainer's format: a string prompt sampled through the chat template is written as a
one-user-message list, so the trainer tokenizes exactly the prompt the policy sampled from; and
`pairs_stats.json`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

from aipo_mp.data.records import load_records, write_jsonl
from aipo_mp.errors import ConfigError
from aipo_mp.runtime.files import atomic_write_json
from aipo_mp.tokenization import training_prompt

MODES = ("best_worst", "ranked")
PAIR_DROP_REASONS = ("too_few_samples", "truncated", "identical_texts", "small_gap", "small_rank_gap")
SCORED_FIELDS = ("prompt_id", "prompt", "sample_index", "text", "score")


def build_pairs(scored, min_gap: float = 0.0, allow_truncated: bool = False, mode: str = "best_worst",
                max_pairs_per_prompt: Optional[int] = None,
                out_dir: Optional[str | Path] = None, min_rank_gap: int = 0) -> tuple[list[dict], dict]:
    """(pairs, stats) from scored samples (a list or a scored.jsonl path); see the module doc."""
    if mode not in MODES:
        raise ConfigError(f"pairs mode {mode!r} is not one of {', '.join(MODES)}")
    if not isinstance(min_gap, (int, float)) or not math.isfinite(min_gap) or min_gap < 0:
        raise ConfigError(f"pairs min_gap={min_gap!r}: must be a finite number >= 0")
    if max_pairs_per_prompt is not None and (not isinstance(max_pairs_per_prompt, int) or max_pairs_per_prompt < 1):
        raise ConfigError(f"pairs max_pairs_per_prompt={max_pairs_per_prompt!r}: must be an integer >= 1 or null")
    if mode == "best_worst" and max_pairs_per_prompt not in (None, 1):
        raise ConfigError("pairs max_pairs_per_prompt > 1 needs mode 'ranked' (best_worst makes one pair per prompt)")

    if not isinstance(min_rank_gap, int) or isinstance(min_rank_gap, bool) or min_rank_gap < 0:
        raise ConfigError(f"pairs min_rank_gap={min_rank_gap!r}: must be an integer >= 0")
    records = load_scored(scored)
    if min_rank_gap and not all("rank" in r for r in records):
        raise ConfigError("pairs.min_rank_gap needs ranks in scored.jsonl: score with a ranker "
                          "(reward.kind=pairwise or judge), or set pairs.min_rank_gap=0")
    groups = group_by_prompt(records)
    pairs: list[dict] = []
    dropped: Counter = Counter()
    truncated_samples = 0
    for samples in groups:
        truncated = [s for s in samples if s.get("finish_reason") == "length"]
        usable = samples if allow_truncated else [s for s in samples if s.get("finish_reason") != "length"]
        truncated_samples += len(truncated) if not allow_truncated else 0
        distinct = distinct_texts(usable)
        if len(samples) < 2:
            dropped["too_few_samples"] += 1
            continue
        if len(usable) < 2:
            dropped["truncated"] += 1
            continue
        if len(distinct) < 2:
            dropped["identical_texts"] += 1
            continue
        ranked = sorted(distinct, key=lambda s: (-s["score"], s["sample_index"]))
        if mode == "best_worst":
            candidates = [(ranked[0], ranked[-1])]
        else:
            candidates = [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
        candidates = [(c, r) for c, r in candidates if passes(c["score"] - r["score"], min_gap)]
        if not candidates:
            dropped["small_gap"] += 1
            continue
        if min_rank_gap:
            candidates = [(c, r) for c, r in candidates if r["rank"] - c["rank"] >= min_rank_gap]
            if not candidates:
                dropped["small_rank_gap"] += 1
                continue
        candidates.sort(key=lambda cr: -(cr[0]["score"] - cr[1]["score"]))  # stable: ties keep rank order
        if max_pairs_per_prompt is not None:
            candidates = candidates[:max_pairs_per_prompt]
        pairs.extend(make_pair(c, r) for c, r in candidates)
    if mode == "ranked":
        pairs.sort(key=lambda p: -p["gap"])  # stable: ties keep prompt order

    stats = pair_stats(pairs, dropped, len(groups), truncated_samples, mode, min_gap, allow_truncated,
                       max_pairs_per_prompt)
    stats["min_rank_gap"] = min_rank_gap
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_jsonl(out_dir / "pairs.jsonl", pairs)
        atomic_write_json(out_dir / "pairs_stats.json", stats)
    return pairs, stats


def passes(gap: float, min_gap: float) -> bool:
    return gap > 0 and gap >= min_gap


def load_scored(scored) -> list[dict]:
    records = load_records(scored, SCORED_FIELDS, "scored sample",
                           "build pairs from the scored.jsonl that aipo_mp.rounds.rewards wrote")
    for k, record in enumerate(records):
        score = record["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ConfigError(f"scored sample {k} (prompt_id={json.dumps(record['prompt_id'])}) has score "
                              f"{score!r}; scores must be finite numbers")
    return records


def group_by_prompt(records: list[dict]) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(json.dumps(record["prompt_id"]), []).append(record)
    return list(groups.values())


def distinct_texts(samples: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in sorted(samples, key=lambda s: s["sample_index"]):
        if s["text"] not in seen:
            seen.add(s["text"])
            out.append(s)
    return out


def make_pair(chosen: dict, rejected: dict) -> dict:
    return {
        "prompt_id": chosen["prompt_id"], "prompt": training_prompt(chosen),
        "chosen": chosen["text"], "rejected": rejected["text"],
        "chosen_score": chosen["score"], "rejected_score": rejected["score"],
        "gap": chosen["score"] - rejected["score"],
        "chosen_tokens": chosen.get("num_tokens"), "rejected_tokens": rejected.get("num_tokens"),
        "chosen_sample_index": chosen["sample_index"], "rejected_sample_index": rejected["sample_index"],
    }


def mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def pair_stats(pairs: list[dict], dropped: Counter, prompts: int, truncated_samples: int, mode: str,
               min_gap: float, allow_truncated: bool, max_pairs_per_prompt: Optional[int]) -> dict:
    return {
        "mode": mode, "min_gap": min_gap, "allow_truncated": allow_truncated,
        "max_pairs_per_prompt": max_pairs_per_prompt,
        "prompts": prompts,
        "kept": len(pairs),  # pairs written
        "kept_prompts": len({json.dumps(p["prompt_id"]) for p in pairs}),
        "dropped": {reason: dropped.get(reason, 0) for reason in PAIR_DROP_REASONS},  # prompts, by reason
        "truncated_samples_left_out": truncated_samples,
        "mean_chosen_tokens": mean([p["chosen_tokens"] for p in pairs]),
        "mean_rejected_tokens": mean([p["rejected_tokens"] for p in pairs]),
        "mean_chosen_score": mean([p["chosen_score"] for p in pairs]),
        "mean_rejected_score": mean([p["rejected_score"] for p in pairs]),
        "mean_gap": mean([p["gap"] for p in pairs]),
    }
