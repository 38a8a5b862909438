"""The per-round report of a run directory: a table (markdown + JSON) and PNG plots of mean
reward, chosen/rejected reward, response length, agreement, KL to the initial policy (sampled
estimate) and win rate against the previous round under the reward.

`python -m aipo_mp.rounds.report kl ...` computes the sampled KL with vLLM (one engine at a time):
KL(π_r || π_0) ≈ mean over round-r samples y ~ π_r(·|x) of log π_r(y|x) − log π_0(y|x).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from aipo_mp.io_utils import atomic_write_json, atomic_write_text

KL_SAMPLES = 64  # samples per round used for the KL estimate


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def win_rate(current: list[dict], previous: list[dict]) -> Optional[float]:
    """Fraction of prompts whose mean score rose from the previous round (ties count half)."""
    def by_prompt(rows):
        out: dict = {}
        for r in rows:
            out.setdefault(str(r["prompt_id"]), []).append(r["score"])
        return {k: sum(v) / len(v) for k, v in out.items()}

    cur, prev = by_prompt(current), by_prompt(previous)
    common = [k for k in cur if k in prev]
    if not common:
        return None
    return sum(1.0 if cur[k] > prev[k] else 0.5 if cur[k] == prev[k] else 0.0 for k in common) / len(common)


def round_rows(run_dir: Path) -> list[dict]:
    kl = json.loads((run_dir / "kl.json").read_text()) if (run_dir / "kl.json").exists() else {}
    rows, previous = [], None
    r = 0
    while (run_dir / f"round_{r}").is_dir():
        rd = run_dir / f"round_{r}"
        scored = read_jsonl(rd / "scored.jsonl")
        if not scored:
            break
        stats = json.loads((rd / "pairs_stats.json").read_text()) if (rd / "pairs_stats.json").exists() else {}
        metrics = read_jsonl(rd / "train" / "metrics.jsonl")
        rows.append({
            "round": r,
            "mean_reward": mean(s["score"] for s in scored),
            "chosen_reward": stats.get("mean_chosen_score"),
            "rejected_reward": stats.get("mean_rejected_score"),
            "mean_length": mean(s.get("num_tokens") for s in scored),
            "pairs": stats.get("kept"),
            "agreement": mean(m.get("agreement") for m in metrics),
            "train_accuracy": metrics[-1].get("rewards/accuracy") if metrics else None,
            "kl_to_initial": 0.0 if r == 0 else kl.get(str(r)),
            "win_rate_vs_previous": win_rate(scored, previous) if previous else None,
        })
        previous = scored
        r += 1
    return rows


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no finished round yet)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


PLOTS = {
    "reward.png": ("mean reward of the round's samples", ["mean_reward", "chosen_reward", "rejected_reward"]),
    "length.png": ("mean response length (tokens)", ["mean_length"]),
    "agreement.png": ("agreement (reference already prefers chosen)", ["agreement"]),
    "kl.png": ("sampled KL to the initial policy", ["kl_to_initial"]),
    "win_rate.png": ("win rate vs the previous round", ["win_rate_vs_previous"]),
}


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, (title, keys) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for k in keys:
            pts = [(r["round"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_title(title)
        ax.set_xlabel("round")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = out_dir / f".{name}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out_dir / name)
        paths.append(out_dir / name)
    return paths


def write_report(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = round_rows(run_dir)
    atomic_write_json(out / "report.json", rows)
    atomic_write_text(out / "report.md", "# Rounds\n\n" + markdown_table(rows))
    return plot(rows, out)


# ---------------------------------------------------------------------------------------------
# Sampled KL with vLLM
# ---------------------------------------------------------------------------------------------


def sample_token_lists(samples: list[dict], tokenizer) -> list[tuple[list[int], int]]:
    """(prompt + response ids, number of prompt ids), tokenized as the sampler saw them."""
    from aipo_mp.rounds.sampling import encode_prompt

    out = []
    for s in samples:
        prompt_ids, _ = encode_prompt(tokenizer, s["prompt"], s.get("chat_format", True))
        response = tokenizer(s["text"], add_special_tokens=False).input_ids
        if s.get("finish_reason") == "stop":
            response = response + [tokenizer.eos_token_id]
        out.append((list(prompt_ids) + list(response), len(prompt_ids)))
    return out


def response_logprob_sums(model_dir: str, token_lists: list[tuple[list[int], int]],
                          tensor_parallel: int = 1) -> list[float]:
    from aipo_mp.rounds.sampling import logprobs_of

    per_token = logprobs_of(model_dir, [ids for ids, _ in token_lists], tensor_parallel=tensor_parallel)
    # logprobs_of gives L-1 values: position t is log p(ids[t+1] | ids[:t+1]).
    return [sum(lp[n_prompt - 1:]) for lp, (_, n_prompt) in zip(per_token, token_lists)]


def kl_sums(run_dir: Path, rounds: list[str], initial: str, shard: tuple[int, int] = (0, 1),
            tensor_parallel: int = 1) -> list[dict]:
    """{"round", "sum", "count"} of log pi_r - log pi_0 over this task's slice (task k of W takes
    every W-th sample) of each round's first KL_SAMPLES samples."""
    from transformers import AutoTokenizer

    k, world = shard
    out = []
    for item in rounds:
        r, model_dir = item.split("=", 1)
        if r == "0":
            continue
        samples = [s for s in read_jsonl(run_dir / f"round_{r}" / "samples.jsonl") if s.get("text")][:KL_SAMPLES]
        samples = samples[k::world]
        if not samples:
            continue
        tok = AutoTokenizer.from_pretrained(model_dir)
        lists = sample_token_lists(samples, tok)
        lp_policy = response_logprob_sums(model_dir, lists, tensor_parallel)
        lp_initial = response_logprob_sums(initial, lists, tensor_parallel)
        out.append({"round": r, "sum": sum(a - b for a, b in zip(lp_policy, lp_initial)), "count": len(lists)})
    return out


def kl_from_sums(rows: list[dict]) -> dict:
    totals: dict = {}
    for row in rows:
        s, n = totals.get(row["round"], (0.0, 0))
        totals[row["round"]] = (s + row["sum"], n + row["count"])
    return {r: (s / n if n and math.isfinite(s / n) else None) for r, (s, n) in totals.items()}


def kl_main(args) -> int:
    run_dir = Path(args.run_dir)
    if args.shard_dir:  # one task of the placed kl stage: its slice of every round, merged by the driver
        from aipo_mp.rounds.shards import ShardDir, StopFlag, run_shard_task, task_identity

        stop = StopFlag()
        rank, world, _, _ = task_identity()
        shards = ShardDir(args.shard_dir, world)
        work = lambda k, _end: kl_sums(run_dir, args.rounds, args.initial, (k, world), args.tensor_parallel)
        return run_shard_task(shards, [(k, k + 1) for k in range(world)], work, stop, rank, world)
    rows = kl_sums(run_dir, args.rounds, args.initial, tensor_parallel=args.tensor_parallel)
    atomic_write_json(args.out, kl_from_sums(rows))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aipo_mp.rounds.report")
    sub = parser.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kl")
    k.add_argument("--run-dir", required=True)
    k.add_argument("--out", default=None)
    k.add_argument("--shard-dir", default=None, help="one task of the placed kl stage: write its shard here")
    k.add_argument("--tensor-parallel", type=int, default=1, help="GPUs per engine (the sampling layout)")
    k.add_argument("--initial", required=True)
    k.add_argument("rounds", nargs="*", help="ROUND=HF_DIR")
    args = parser.parse_args(argv)
    return kl_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
