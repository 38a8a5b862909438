"""The per-round report of a run directory: a table (markdown + JSON) and PNG plots of mean
reward, chosen/rejected reward, response length (mean and spread), agreement, KL to the initial
policy (sampled estimate), and win rates: against the previous round, and against round 0 both
raw and **length-controlled**.

Length-aware evaluation. Iterative preference training tends to exploit length: a judge (or a
reward) that likes longer answers makes the raw win rate climb while the answers only grow. Per
round r >= 1 the report compares each answer of round r with round 0's answer to the same prompt
(same prompt id and sample index) and fits, as AlpacaEval 2.0's length-controlled win rate does,
a logistic model of the win probability with a length term:

    P(round r wins) = sigmoid(theta + phi * tanh(delta_len / std(delta_len)))

(delta_len = answer tokens of round r minus round 0), by maximum likelihood with soft labels
(ties are 0.5) and a small ridge on phi. The length-controlled win rate is sigmoid(theta): the
predicted win rate with the length term set to zero, i.e. at equal length. Raw and
length-controlled numbers are reported side by side: a raw rise that is only length shows as a
raw win rate far above a length-controlled one near 0.5.

Where the judgments come from: `round_R/judgments_vs_round0.jsonl` when the run wrote it (the
`compare` stage of the pairwise and judge rankers, which judge the two answers directly), else the
scalar scores of `scored.jsonl` (a reward model or a rule: the higher score wins). Scores written
by a ranker (records with a "ranker" field) rank answers within one prompt's candidates only and
are not comparable across rounds: without a judgments file such rounds get no win rate vs round 0.

`python -m aipo_mp.rounds.report kl ...` computes the sampled KL with vLLM (one engine at a time):
KL(pi_r || pi_0) ~= mean over round-r samples y ~ pi_r(.|x) of log pi_r(y|x) - log pi_0(y|x).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from aipo_mp.runtime.files import atomic_write_json, atomic_write_text

KL_SAMPLES = 64  # samples per round used for the KL estimate
JUDGMENTS_NAME = "judgments_vs_round0.jsonl"
BASELINE_JUDGMENTS_NAME = "judgments_vs_baseline.jsonl"
BASELINE_SCORED = Path("baseline") / "scored.jsonl"  # the fixed baseline answers scored by the reward
LENGTH_RIDGE = 1e-2  # ridge on the length coefficient: finite when the judge is a pure length rule
LENGTH_ONLY_GAP = 0.1  # raw - length-controlled win rate above which the report flags a length effect


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def percentile(xs: list[float], q: float) -> Optional[float]:
    """Linear-interpolated q-quantile (0 <= q <= 1) of the values, None for none."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


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


# ---------------------------------------------------------------------------------------------
# Length-controlled win rate (pure functions)
# ---------------------------------------------------------------------------------------------


def scores_comparable(scored: list[dict]) -> bool:
    """Scalar rewards compare across rounds; a ranker's within-prompt scores do not."""
    return bool(scored) and not any("ranker" in s for s in scored)


def match_baseline(current: list[dict], baseline: list[dict]) -> list[tuple[dict, dict]]:
    """(answer, baseline answer) pairs: the baseline answer with the same prompt id and sample
    index, or, for a baseline with one answer per prompt (a fixed answer file), that answer."""
    by_key = {(json.dumps(b["prompt_id"]), b.get("sample_index")): b for b in baseline}
    per_prompt: dict[str, list[dict]] = {}
    for b in baseline:
        per_prompt.setdefault(json.dumps(b["prompt_id"]), []).append(b)
    out = []
    for c in current:
        pid = json.dumps(c["prompt_id"])
        b = by_key.get((pid, c.get("sample_index")))
        if b is None and len(per_prompt.get(pid, ())) == 1:
            b = per_prompt[pid][0]
        if b is not None:
            out.append((c, b))
    return out


def judgments_from_scores(current: list[dict], baseline: list[dict]) -> list[dict]:
    """One judgment per answer of `current` that has a `baseline` answer (match_baseline):
    win 1 / 0.5 / 0 as its score is above / equal to / below the baseline's."""
    out = []
    for c, b in match_baseline(current, baseline):
        win = 1.0 if c["score"] > b["score"] else 0.5 if c["score"] == b["score"] else 0.0
        out.append({"prompt_id": c["prompt_id"], "sample_index": c["sample_index"], "win": win,
                    "length": c.get("num_tokens"), "baseline_length": b.get("num_tokens")})
    return out


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def length_controlled_win_rate(judgments: list[dict], ridge: float = LENGTH_RIDGE) -> Optional[dict]:
    """Raw and length-controlled win rate of judgments {"win" in [0, 1], "length",
    "baseline_length"} (see the module docstring). None when there are no usable judgments.

    Returns {"n", "win_rate" (raw mean), "lc_win_rate" (sigmoid(theta)), "theta", "length_coef"
    (phi), "mean_length_diff"}."""
    import numpy as np

    rows = [j for j in judgments if j.get("win") is not None and j.get("length") is not None
            and j.get("baseline_length") is not None]
    if not rows:
        return None
    win = np.array([float(j["win"]) for j in rows])
    if ((win < 0) | (win > 1)).any():
        raise ValueError("judgment wins must lie in [0, 1]")
    delta = np.array([float(j["length"]) - float(j["baseline_length"]) for j in rows])
    scale = delta.std()
    feature = np.tanh(delta / scale) if scale > 0 else np.zeros_like(delta)
    theta, phi = fit_logistic(win, feature, ridge)
    return {"n": len(rows), "win_rate": float(win.mean()), "lc_win_rate": sigmoid(theta), "theta": theta,
            "length_coef": phi, "mean_length_diff": float(delta.mean())}


def fit_logistic(target, feature, ridge: float, iterations: int = 100) -> tuple[float, float]:
    """(theta, phi) maximizing sum of soft-label log-likelihoods of sigmoid(theta + phi*feature)
    minus ridge/2 * phi^2 (Newton's method; the objective is concave). theta is unpenalized but
    clipped to +-20 (a round that wins or loses everything)."""
    import numpy as np

    x = np.stack([np.ones_like(feature), feature], axis=1)
    w = np.zeros(2)
    penalty = np.array([1e-8, ridge])  # a touch on theta keeps the Hessian invertible when all wins agree
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (p - target) + penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w = np.clip(w - step, -20, 20)
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


# ---------------------------------------------------------------------------------------------
# Rows of the report
# ---------------------------------------------------------------------------------------------


def round_judgments(rd: Path, scored: list[dict], baseline: Optional[list[dict]],
                    name: str = JUDGMENTS_NAME) -> Optional[list[dict]]:
    if (rd / name).exists():
        return read_jsonl(rd / name)
    if baseline is not None and scores_comparable(scored) and scores_comparable(baseline):
        return judgments_from_scores(scored, baseline)
    return None


def round_rows(run_dir: Path) -> list[dict]:
    kl = json.loads((run_dir / "kl.json").read_text()) if (run_dir / "kl.json").exists() else {}
    rows, previous, first = [], None, None
    baseline = read_jsonl(run_dir / BASELINE_SCORED)
    r = 0
    while (run_dir / f"round_{r}").is_dir():
        rd = run_dir / f"round_{r}"
        scored = read_jsonl(rd / "scored.jsonl")
        if not scored:
            break
        stats = json.loads((rd / "pairs_stats.json").read_text()) if (rd / "pairs_stats.json").exists() else {}
        metrics = read_jsonl(rd / "train" / "metrics.jsonl")
        lengths = [s.get("num_tokens") for s in scored]
        lc = None
        if r > 0:
            judgments = round_judgments(rd, scored, first)
            lc = length_controlled_win_rate(judgments) if judgments else None
        judgments = round_judgments(rd, scored, baseline or None, BASELINE_JUDGMENTS_NAME)
        vs_base = length_controlled_win_rate(judgments) if judgments else None
        rows.append({
            "round": r,
            "mean_reward": mean(s["score"] for s in scored),
            "chosen_reward": stats.get("mean_chosen_score"),
            "rejected_reward": stats.get("mean_rejected_score"),
            "mean_length": mean(lengths),
            "length_p10": percentile(lengths, 0.1),
            "length_p50": percentile(lengths, 0.5),
            "length_p90": percentile(lengths, 0.9),
            "pairs": stats.get("kept"),
            "agreement": mean(m.get("agreement") for m in metrics),
            "train_accuracy": metrics[-1].get("rewards/accuracy") if metrics else None,
            "kl_to_initial": 0.0 if r == 0 else kl.get(str(r)),
            "win_rate_vs_previous": (win_rate(scored, previous)
                                     if previous and scores_comparable(scored) and scores_comparable(previous) else None),
            "win_rate_vs_round0": lc["win_rate"] if lc else None,
            "lc_win_rate_vs_round0": lc["lc_win_rate"] if lc else None,
            "length_diff_vs_round0": lc["mean_length_diff"] if lc else None,
            "win_rate_vs_baseline": vs_base["win_rate"] if vs_base else None,
            "lc_win_rate_vs_baseline": vs_base["lc_win_rate"] if vs_base else None,
        })
        rows[-1].update(moe_columns(metrics))
        previous = scored
        first = first if first is not None else scored
        r += 1
    return rows


def moe_columns(metrics: list[dict]) -> dict:
    """Routing of a mixture-of-experts policy over the round's training steps (none for dense):
    the worst per-layer max/mean tokens per expert, the share of top-k slots dropped by the
    capacity limit, and the share of probe tokens routed differently from the round's start."""
    moe = [m for m in metrics if "moe/load_imbalance" in m]
    if not moe:
        return {}
    return {"expert_load_imbalance": max(m["moe/load_imbalance"] for m in moe),
            "expert_dropped_share": mean(m["moe/dropped_share"] for m in moe),
            "routing_changed_share": moe[-1]["moe/routing_changed_share"],
            "router_aux_loss": mean(m["moe/aux_loss"] for m in moe)}


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict], cols: Optional[list[str]] = None) -> str:
    if not rows:
        return "(no finished round yet)\n"
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


LENGTH_COLUMNS = ["round", "mean_length", "length_p10", "length_p50", "length_p90", "length_diff_vs_round0",
                  "win_rate_vs_round0", "lc_win_rate_vs_round0", "win_rate_vs_baseline", "lc_win_rate_vs_baseline"]


def length_section(rows: list[dict]) -> str:
    """Raw vs length-controlled win rate and length per round, with a line per round whose raw
    gain is mostly length."""
    text = ("## Length-aware evaluation\n\nWin rate of each round's answers against round 0's (same prompt "
            "and sample index) and against the fixed baseline answers when given (rounds.baseline_answers): raw, "
            "and length-controlled (a logistic model with a length-difference term, reported at zero length "
            "difference, as AlpacaEval 2.0's LC win rate).\n\n")
    text += markdown_table(rows, LENGTH_COLUMNS)
    notes = []
    for r in rows:
        for against in ("round0", "baseline"):
            raw, lc = r.get(f"win_rate_vs_{against}"), r.get(f"lc_win_rate_vs_{against}")
            if raw is None or lc is None:
                continue
            what = f"round {r['round']} vs {'round 0' if against == 'round0' else 'the baseline answers'}"
            if raw - lc > LENGTH_ONLY_GAP:
                notes.append(f"- {what}: raw win rate {raw:.3f} but length-controlled {lc:.3f}: "
                             "much of the raw gain is longer answers.")
            else:
                notes.append(f"- {what}: raw win rate {raw:.3f}, length-controlled {lc:.3f}.")
    return text + ("\n" + "\n".join(notes) + "\n" if notes else "")


# name: (title, [(key, label, style)], draw a 0.5 line)
PLOTS = {
    "reward.png": ("mean reward of the round's samples",
                   [("mean_reward", "all samples", "-"), ("chosen_reward", "chosen", "-"),
                    ("rejected_reward", "rejected", "-")], False),
    "length.png": ("response length (tokens): mean, p10-p90", [("mean_length", "mean", "-")], False),
    "agreement.png": ("agreement (reference already prefers chosen)", [("agreement", "agreement", "-")], False),
    "kl.png": ("sampled KL to the initial policy", [("kl_to_initial", "KL", "-")], False),
    "win_rate.png": ("win rates: raw and length-controlled",
                     [("win_rate_vs_round0", "raw vs round 0", "-"),
                      ("lc_win_rate_vs_round0", "length-controlled vs round 0", "-"),
                      ("win_rate_vs_baseline", "raw vs baseline answers", "--"),
                      ("lc_win_rate_vs_baseline", "length-controlled vs baseline", "--"),
                      ("win_rate_vs_previous", "raw vs previous round", ":")], True),
}


def make_figure(name: str, rows: list[dict]):
    """The matplotlib figure of plot `name` (a key of PLOTS) for the report rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, series, half_line = PLOTS[name]
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label, style in series:
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
    if name == "length.png":
        band = [(r["round"], r["length_p10"], r["length_p90"]) for r in rows if r.get("length_p10") is not None]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], alpha=0.25,
                            label="p10-p90")
    if half_line:
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="0.5 (no preference)")
        ax.set_ylim(0, 1)
    ax.set_xticks(rounds)  # integer round ticks only (matplotlib's default shows 0.25 steps)
    if rounds:
        ax.set_xlim(min(rounds) - 0.25, max(rounds) + 0.25)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("round")
    if len(series) > 1 or half_line or name == "length.png":
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in PLOTS:
        fig = make_figure(name, rows)
        tmp = out_dir / f".{name}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out_dir / name)
        paths.append(out_dir / name)
    return paths


CONSOLE_COLUMNS = [("round", "round", "{:d}"), ("mean_reward", "mean reward", "{:.4f}"), ("pairs", "pairs", "{:d}"),
                   ("kl_to_initial", "KL", "{:.4f}"), ("win_rate_vs_round0", "win rate", "{:.3f}"),
                   ("lc_win_rate_vs_round0", "LC win rate", "{:.3f}")]
BASELINE_CONSOLE_COLUMNS = [("win_rate_vs_baseline", "vs baseline", "{:.3f}"),
                            ("lc_win_rate_vs_baseline", "LC vs baseline", "{:.3f}")]


def console_summary(rows: list[dict], report_md: Path) -> str:
    """The end-of-run table a person reads: one line per round (win rates against round 0, and
    against the baseline answers when the run has them), then where the full report is."""
    cols = CONSOLE_COLUMNS + (BASELINE_CONSOLE_COLUMNS if any(r.get("win_rate_vs_baseline") is not None
                                                              for r in rows) else [])
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols])
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = "win rates: each round's answers vs round 0's (LC: length-controlled)"
    return "\n".join(lines) + f"\n{note}\nfull report (all columns, length notes, plots): {report_md}\n"


class RoundTracker:
    """Each round's report row (keys round/<column>, W&B step = the round) and the plots, into
    one W&B run of `aipo-mp run` (output.wandb; aipo_mp/runtime/tracking.py). A row is logged
    once, when it first appears."""

    def __init__(self, wandb_cfg, run_dir: Path):
        import dataclasses

        self.cfg = dataclasses.replace(wandb_cfg, group=wandb_cfg.group or Path(run_dir).name) if wandb_cfg else None
        self.run_dir = Path(run_dir)
        self.run = None
        self.logged: set = set()

    def log(self, rows: list[dict], plots: list[Path], final: bool = False) -> None:
        from aipo_mp.runtime import tracking

        if not tracking.enabled(self.cfg) or not rows:
            return
        if self.run is None:
            self.run = tracking.start_run(self.cfg, self.run_dir, f"{self.run_dir.name}-rounds", "rounds")
        for row in rows:
            if row["round"] not in self.logged:
                self.run.log(tracking.numeric(row, "round/"), step=row["round"])
                self.logged.add(row["round"])
        import wandb

        self.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}, step=max(self.logged))
        if final:
            cols = list(rows[0])
            self.run.log({"rounds": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])},
                         step=max(self.logged))
            self.run.finish()
            self.run = None


def report_rows(run_dir: str | Path) -> list[dict]:
    """The rows of the last written report (report/report.json)."""
    path = Path(run_dir) / "report" / "report.json"
    return json.loads(path.read_text()) if path.exists() else []


def write_report(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = round_rows(run_dir)
    atomic_write_json(out / "report.json", rows)
    atomic_write_text(out / "report.md", "# Rounds\n\n" + markdown_table(rows) + "\n" + length_section(rows))
    return plot(rows, out)


# ---------------------------------------------------------------------------------------------
# Sampled KL with vLLM
# ---------------------------------------------------------------------------------------------


def sample_token_lists(samples: list[dict], tokenizer) -> list[tuple[list[int], int]]:
    """(prompt + response ids, number of prompt ids), tokenized as the sampler saw them."""
    from aipo_mp.tokenization import encode_prompt

    out = []
    for s in samples:
        prompt_ids, _ = encode_prompt(tokenizer, s["prompt"], s.get("chat_format", True))
        response = tokenizer(s["text"], add_special_tokens=False).input_ids
        if s.get("finish_reason") == "stop":
            response = response + [tokenizer.eos_token_id]
        out.append((list(prompt_ids) + list(response), len(prompt_ids)))
    return out


def response_logprob_sums(model_dir: str, token_lists: list[tuple[list[int], int]],
                          tensor_parallel: int = 1, **engine_options) -> list[float]:
    from aipo_mp.rounds.engines import logprobs_of

    per_token = logprobs_of(model_dir, [ids for ids, _ in token_lists], tensor_parallel=tensor_parallel,
                            **engine_options)
    # logprobs_of gives L-1 values: position t is log p(ids[t+1] | ids[:t+1]).
    return [sum(lp[n_prompt - 1:]) for lp, (_, n_prompt) in zip(per_token, token_lists)]


def kl_sums(run_dir: Path, rounds: list[str], initial: str, shard: tuple[int, int] = (0, 1),
            tensor_parallel: int = 1, **engine_options) -> list[dict]:
    """{"round", "sum", "count"} of log pi_r - log pi_0 over this engine's slice (engine k of E
    takes every E-th sample) of each round's first KL_SAMPLES samples. `engine_options` (the
    sampling layout's pipeline_parallel, data_parallel, expert_parallel; task) go to start_engine."""
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
        lp_policy = response_logprob_sums(model_dir, lists, tensor_parallel, **engine_options)
        lp_initial = response_logprob_sums(initial, lists, tensor_parallel, **engine_options)
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
    layout = dict(pipeline_parallel=args.pipeline_parallel, data_parallel=args.data_parallel,
                  expert_parallel=args.expert_parallel)
    if args.shard_dir:  # one engine task of the placed kl stage: its slice of every round, merged by the driver
        from aipo_mp.rounds.engines import engine_task, serve_headless
        from aipo_mp.rounds.shards import ShardDir, StopFlag, claim_head_devices, engine_todo, run_shard_task

        stop = StopFlag()
        task = engine_task()
        shards = ShardDir(args.shard_dir, task.engines)
        if not task.is_head:  # a spanning engine's other nodes: the headless part of each engine the head starts
            return serve_headless(task, finished=lambda: not engine_todo(shards, task.engine, task.engines))
        if engine_todo(shards, task.engine, task.engines):  # this task's engines: its slice of the node
            claim_head_devices(task, args.tensor_parallel * args.pipeline_parallel * args.data_parallel)
        options = dict(layout, task=task)
        work = lambda k, _end: kl_sums(run_dir, args.rounds, args.initial, (k, task.engines), args.tensor_parallel,
                                       **options)

        return run_shard_task(shards, [(k, k + 1) for k in range(task.engines)], work, stop, task.engine, task.engines)
    rows = kl_sums(run_dir, args.rounds, args.initial, tensor_parallel=args.tensor_parallel, **layout)
    atomic_write_json(args.out, kl_from_sums(rows))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aipo-mp")
    sub = parser.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kl")
    k.add_argument("--run-dir", required=True)
    k.add_argument("--out", default=None)
    k.add_argument("--shard-dir", default=None, help="one task of the placed kl stage: write its shard here")
    k.add_argument("--tensor-parallel", type=int, default=1, help="GPUs per engine (the sampling layout)")
    k.add_argument("--pipeline-parallel", type=int, default=1, help="pipeline stages per engine (the sampling layout)")
    k.add_argument("--data-parallel", type=int, default=1, help="vLLM data-parallel ranks per engine")
    k.add_argument("--expert-parallel", action="store_true", help="vLLM expert parallelism (MoE policies)")
    k.add_argument("--initial", required=True)
    k.add_argument("rounds", nargs="*", help="ROUND=HF_DIR")
    args = parser.parse_args(argv)
    return kl_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
