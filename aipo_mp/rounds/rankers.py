"""Rankers: order a prompt's candidate answers by comparing them two at a time, beside the scalar
rewards of `aipo_mp.rounds.rewards` (`reward.kind: pairwise | judge`).

A comparator maps (prompt, answer A, answer B) to P(A better than B):

* `PairwiseClassifier`: an HF `*ForSequenceClassification` model with one label (a PairRM-style
  comparator) reading `reward.template` filled with {prompt}, {a}, {b}; P = sigmoid(logit).
  Run with transformers (these comparators are small; a GPU is used when present).
* `JudgeComparator`: an instruction model served by vLLM (the reward layout: engines of
  `reward.tensor_parallel` GPUs) given
  `reward.template` (a question asking which answer is better); the verdict is read from the
  teacher-forced log-probs of the two answer strings `reward.judge_answers` (" A", " B"):
  P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)), an answer string's log-prob summed over its tokens.

Ranking (`rank_samples`): per prompt, every ordered pair (i, j), i != j, is judged in both orders
and the two verdicts are combined into P_ij = (p(i, j) + 1 - p(j, i)) / 2, so a comparator's
position bias cancels and P_ij + P_ji = 1; swapping which answer is shown first changes nothing.
P is then aggregated (`reward.aggregate`):

* `bradley_terry`: maximum-likelihood log-strengths of the Bradley-Terry model
  P(i beats j) = s_i / (s_i + s_j) with soft outcomes P_ij (Hunter's MM iterations, a pseudo-count
  of 0.01 per side keeps a candidate that wins everything finite), centred to mean 0;
* `copeland`: wins minus losses over the other candidates (P_ij > 0.5 is a win, = 0.5 a tie).

The output is `scored.jsonl` like a reward's: every sample with "score" (the aggregate), "rank"
(1 = best within its prompt; ties broken by sample index) and "ranker" (the kind), so the pairs
stage is unchanged (`pairs.min_rank_gap` reads the ranks). Ranker scores order candidates of one
prompt only; the report compares rounds with `compare` (below), which judges round r's answers
against round 0's directly (both orders), into `round_R/judgments_vs_round0.jsonl`.

Placement: in `aipo-mp run` the ranker and compare stages run `reward.replicas` engines over the
allocation, one task each (`rank_task`, `compare_task`), each on its shards: a ranker's shards are
whole prompts, compare's are runs of matched answers; the driver merges them in input order, so the
output equals one engine's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from aipo_mp.config import reward_kind
from aipo_mp.data.records import write_jsonl
from aipo_mp.errors import ConfigError, UserError
from aipo_mp.rounds.rewards import load_samples, plain_prompt_text
from aipo_mp.validate import check_template, reward_errors

DEFAULT_PAIRWISE_TEMPLATE = "{prompt}\nResponse A: {a}\nResponse B: {b}"
DEFAULT_JUDGE_TEMPLATE = ("Which answer to the question is better?\n\nQuestion: {prompt}\n\nAnswer A: {a}\n\n"
                          "Answer B: {b}\n\nThe better answer is")
BT_PSEUDO_COUNT = 0.01

# (prompt, answer A, answer B) items -> P(A better than B) for each
Comparator = Callable[[Sequence[tuple]], list[float]]


# ---------------------------------------------------------------------------------------------
# Aggregation (pure functions of a preference matrix)
# ---------------------------------------------------------------------------------------------


def bradley_terry(prefs: list[list[float]], iterations: int = 1000, tol: float = 1e-12) -> list[float]:
    """Log-strengths (mean 0) of the Bradley-Terry model fit to soft outcomes prefs[i][j] =
    P(i beats j) (diagonal ignored), one comparison per ordered pair."""
    n = len(prefs)
    if n == 1:
        return [0.0]
    wins = [sum(prefs[i][j] + BT_PSEUDO_COUNT for j in range(n) if j != i) for i in range(n)]
    games = [[0.0 if i == j else prefs[i][j] + prefs[j][i] + 2 * BT_PSEUDO_COUNT for j in range(n)] for i in range(n)]
    strength = [1.0] * n
    for _ in range(iterations):
        new = [wins[i] / sum(games[i][j] / (strength[i] + strength[j]) for j in range(n) if j != i) for i in range(n)]
        norm = math.exp(sum(math.log(s) for s in new) / n)  # geometric mean 1
        new = [s / norm for s in new]
        change = max(abs(a - b) for a, b in zip(new, strength))
        strength = new
        if change < tol:
            break
    return [math.log(s) for s in strength]


def copeland(prefs: list[list[float]]) -> list[float]:
    """Wins minus losses of each candidate (ties count 0)."""
    n = len(prefs)
    return [float(sum((prefs[i][j] > 0.5) - (prefs[i][j] < 0.5) for j in range(n) if j != i)) for i in range(n)]


AGGREGATIONS = {"bradley_terry": bradley_terry, "copeland": copeland}


def symmetric_preferences(n: int, verdict: dict[tuple[int, int], float]) -> list[list[float]]:
    """P_ij = (p(i, j) + 1 - p(j, i)) / 2 from verdicts p(i, j) = P(i shown as A beats j shown as B)."""
    prefs = [[0.5] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                prefs[i][j] = (verdict[i, j] + 1.0 - verdict[j, i]) / 2.0
    return prefs


def ranks_of(scores: list[float], order_keys: list) -> list[int]:
    """1 = highest score; equal scores keep `order_keys` order (the sample index)."""
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], order_keys[k]))
    ranks = [0] * len(scores)
    for position, k in enumerate(order):
        ranks[k] = position + 1
    return ranks


# ---------------------------------------------------------------------------------------------
# Ranking samples
# ---------------------------------------------------------------------------------------------


def check_probabilities(values: list[float], expected: int, name: str) -> list[float]:
    if len(values) != expected:
        raise RuntimeError(f"{name} returned {len(values)} verdicts for {expected} comparisons")
    out = []
    for v in values:
        v = float(v)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ConfigError(f"{name} returned P(A better than B) = {v}; a comparator must give probabilities in "
                              "[0, 1] (check the ranker's weights and dtype)")
        out.append(v)
    return out


def rank_samples(samples, comparator: Comparator, aggregate: str = "bradley_terry", kind: str = "pairwise",
                 out_path: Optional[str | Path] = None) -> list[dict]:
    """Every sample with "score", "rank" and "ranker" (see the module docstring), in input order."""
    from aipo_mp.rounds.pairs import group_by_prompt

    if aggregate not in AGGREGATIONS:
        raise ConfigError(f"reward.aggregate={aggregate!r}: choose one of {', '.join(AGGREGATIONS)}")
    records = load_samples(samples)
    groups = group_by_prompt(records)
    items, index = [], []  # all comparisons of all prompts go to the comparator at once (batching)
    for g, group in enumerate(groups):
        for i in range(len(group)):
            for j in range(len(group)):
                if i != j:
                    items.append((group[i]["prompt"], group[i]["text"], group[j]["text"]))
                    index.append((g, i, j))
    verdicts = check_probabilities(comparator(items) if items else [], len(items), f"the {kind} ranker")
    per_group: list[dict] = [{} for _ in groups]
    for (g, i, j), p in zip(index, verdicts):
        per_group[g][i, j] = p
    ranked = {}
    for g, group in enumerate(groups):
        # Rounded so that candidates the comparator cannot tell apart tie exactly, for the ranks
        # and for the pairs stage alike (the fit leaves float noise).
        scores = [round(x, 9) for x in AGGREGATIONS[aggregate](symmetric_preferences(len(group), per_group[g]))]
        ranks = ranks_of(scores, [s["sample_index"] for s in group])
        for s, score, rank in zip(group, scores, ranks):
            ranked[id(s)] = {**s, "score": score, "rank": rank, "ranker": kind}
    out = [ranked[id(s)] for s in records]
    if out_path is not None:
        write_jsonl(out_path, out)
    return out


def compare_answers(current, baseline, comparator: Comparator, kind: str = "pairwise",
                    out_path: Optional[str | Path] = None) -> list[dict]:
    """Judgments of each `current` answer against the `baseline` answer with the same prompt id and
    sample index (or the one baseline answer of its prompt: report.match_baseline), both orders: {"prompt_id", "sample_index", "win" = P(current better), "length",
    "baseline_length"} (the report's length-controlled win rate reads them)."""
    from aipo_mp.rounds.report import match_baseline

    out = judge_matched(match_baseline(load_samples(current), load_samples(baseline)), comparator, kind)
    if out_path is not None:
        write_jsonl(out_path, out)
    return out


def judge_matched(matched: Sequence[tuple[dict, dict]], comparator: Comparator, kind: str) -> list[dict]:
    """The judgments of (current, baseline) answer pairs (see compare_answers); each depends on
    its own pair only, so any split of the list gives the same judgments."""
    items = [(c["prompt"], c["text"], b["text"]) for c, b in matched]
    items += [(c["prompt"], b["text"], c["text"]) for c, b in matched]
    verdicts = check_probabilities(comparator(items) if items else [], len(items), f"the {kind} ranker")
    m = len(matched)
    return [{"prompt_id": c["prompt_id"], "sample_index": c["sample_index"],
             "win": (verdicts[k] + 1.0 - verdicts[m + k]) / 2.0,
             "length": c.get("num_tokens"), "baseline_length": b.get("num_tokens")} for k, (c, b) in enumerate(matched)]


def fill_template(template: str, prompt, a: str, b: str) -> str:
    return template.format(prompt=plain_prompt_text(prompt).strip(), a=a, b=b)


# ---------------------------------------------------------------------------------------------
# The pairwise classifier (transformers)
# ---------------------------------------------------------------------------------------------


class PairwiseClassifier:
    """P(A better than B) = sigmoid(logit) of a one-label sequence classifier on the template."""

    def __init__(self, model_dir: str | Path, template: Optional[str] = None, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from aipo_mp.rounds.rewards import check_reward_model

        check_reward_model(model_dir)  # a one-label *ForSequenceClassification directory
        self.template = template or DEFAULT_PAIRWISE_TEMPLATE
        check_template(self.template, "pairwise ranker")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # Right padding: left padding would shift the real tokens' positions (RoPE) and the verdict
        # would depend on the batch.
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            raise ConfigError(f"pairwise ranker {model_dir}: config.json has no pad_token_id; set it (the "
                              "classifier reads the last non-padding token)")
        self.batch_size = batch_size
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    def texts(self, items: Sequence[tuple]) -> list[str]:
        return [fill_template(self.template, p, a, b) for p, a, b in items]

    def __call__(self, items: Sequence[tuple]) -> list[float]:
        import torch

        out: list[float] = []
        texts = self.texts(items)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, return_tensors="pt")
            if self.max_length and batch["input_ids"].shape[1] > self.max_length:
                raise ConfigError(f"a pairwise ranker input is {batch['input_ids'].shape[1]} tokens, more than the "
                                  f"ranker's {self.max_length}; lower sampling.max_tokens or shorten reward.template")
            with torch.no_grad():
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float()
            out += torch.sigmoid(logits[:, 0]).tolist()
        return out


# ---------------------------------------------------------------------------------------------
# The LLM judge (vLLM)
# ---------------------------------------------------------------------------------------------


class JudgeComparator:
    """An instruction model asked which answer is better; the verdict from the log-probs of the
    two answer strings after the judge prompt (see the module docstring)."""

    def __init__(self, llm, template: Optional[str] = None, answers: Sequence[str] = (" A", " B"),
                 chat_template: bool = False):
        self.llm = llm
        self.template = template or DEFAULT_JUDGE_TEMPLATE
        check_template(self.template, "judge")
        if len(answers) != 2 or not all(isinstance(a, str) and a for a in answers) or answers[0] == answers[1]:
            raise ConfigError(f"reward.judge_answers={list(answers)!r}: give two different non-empty strings "
                              "(the judge's verdict for A and for B)")
        self.answers = tuple(answers)
        self.chat_template = chat_template
        tokenizer = llm.get_tokenizer()
        self.answer_ids = [list(tokenizer(a, add_special_tokens=False).input_ids) for a in self.answers]
        if not all(self.answer_ids):
            raise ConfigError(f"reward.judge_answers={list(answers)!r}: an answer encodes to no tokens")

    def prompt_ids(self, item: tuple) -> list[int]:
        from aipo_mp.tokenization import encode_prompt

        ids, _ = encode_prompt(self.llm.get_tokenizer(), fill_template(self.template, *item), self.chat_template,
                               "judge prompt")
        return ids

    def __call__(self, items: Sequence[tuple]) -> list[float]:
        from aipo_mp.rounds.engines import logprobs_of

        lists, prompt_lengths = [], []
        for item in items:
            ids = self.prompt_ids(item)
            prompt_lengths.append(len(ids))
            lists += [ids + self.answer_ids[0], ids + self.answer_ids[1]]
        logprobs = logprobs_of(self.llm, lists) if lists else []
        out = []
        for k, n in enumerate(prompt_lengths):
            lp_a = sum(logprobs[2 * k][n - 1:])  # values start at position 1: answer tokens from n - 1 on
            lp_b = sum(logprobs[2 * k + 1][n - 1:])
            out.append(1.0 / (1.0 + math.exp(max(-700.0, min(700.0, lp_b - lp_a)))))
        return out


# ---------------------------------------------------------------------------------------------
# From the config: validation, building a comparator, the reward stage
# ---------------------------------------------------------------------------------------------


def open_comparator(reward, model=None, task=None):
    """(comparator, close) for a ranker kind: the pairwise classifier, or one judge engine (a
    stage's `reward.replicas` engines are its tasks, each with its own; `task`: the head task of a
    placed engine, from engine_task()). `model` may be a live vLLM engine for the judge."""
    kind = reward_kind(reward)
    if kind == "pairwise":
        return PairwiseClassifier(model or reward.model, reward.template, reward.batch_size), lambda: None
    from aipo_mp.rounds.engines import close_engine, is_engine, start_engine

    if model is not None and is_engine(model):
        return JudgeComparator(model, reward.template, reward.judge_answers, reward.chat_template), lambda: None
    llm = start_engine(model or reward.model, tensor_parallel=reward.tensor_parallel,
                       pipeline_parallel=reward.pipeline_parallel, kv_cache_gib=reward.kv_cache_gib,
                       max_model_len=reward.max_model_len, what="judge model", task=task)
    return (JudgeComparator(llm, reward.template, reward.judge_answers, reward.chat_template),
            lambda: close_engine(llm))


class TaskComparator:
    """This engine task's comparator, opened at its first shard (on its own devices) and kept for
    the rest: an engine task with no shard left starts no engine."""

    def __init__(self, reward, task):
        self.reward, self.task = reward, task
        self.comparator: Optional[Comparator] = None
        self.close: Callable[[], None] = lambda: None

    def __call__(self, items: Sequence[tuple]) -> list[float]:
        if self.comparator is None:
            from aipo_mp.rounds.shards import claim_head_devices

            claim_head_devices(self.task, self.reward.tensor_parallel * self.reward.pipeline_parallel)
            self.comparator, self.close = open_comparator(self.reward, task=self.task)
        return self.comparator(items)


def rank_task(samples, reward, shard_root: str | Path, stop) -> int:
    """One engine task of a placed ranker stage (`aipo-mp reward --shard-dir` with reward.kind
    pairwise or judge): rank the prompts of this engine's unfinished shards (whole prompts, laid
    out by `prompt_shards`); the driver merges them back in input order. 0, or 75 when stopped."""
    from aipo_mp.rounds.engines import engine_task, serve_headless
    from aipo_mp.rounds.shards import ShardDir, engine_todo, prompt_shards, run_shard_task

    errors = reward_errors(reward)
    if errors:
        raise ConfigError(errors)
    task = engine_task()
    records = load_samples(samples)
    order, bounds = prompt_shards([r["prompt_id"] for r in records], task.engines)
    shards = ShardDir(shard_root, len(bounds))
    if not task.is_head:  # a spanning engine's other nodes: its headless part
        return serve_headless(task, finished=lambda: not engine_todo(shards, task.engine, task.engines))
    laid_out = [records[k] for k in order]
    comparator = TaskComparator(reward, task)
    work = lambda start, end: rank_samples(laid_out[start:end], comparator, reward.aggregate, reward_kind(reward))
    try:
        return run_shard_task(shards, bounds, work, stop, task.engine, task.engines)
    finally:
        comparator.close()


def compare_task(samples, against: Sequence[tuple[str, str]], reward, shard_root: str | Path, stop) -> int:
    """One engine task of a placed compare stage: for every (baseline answers, judgments file)
    pair k, the judgments of this engine's unfinished shards of the matched answers into
    SHARD_ROOT/k/; the driver merges each into its judgments file. 0, or 75 when stopped."""
    from aipo_mp.rounds.engines import engine_task, serve_headless
    from aipo_mp.rounds.report import match_baseline
    from aipo_mp.rounds.shards import ShardDir, engine_todo, run_shard_task, shard_bounds, shard_count

    task = engine_task()
    current = load_samples(samples)
    matched = [match_baseline(current, load_samples(baseline)) for baseline, _out in against]
    shards = [ShardDir(Path(shard_root) / str(k), shard_count(len(m), task.engines)) for k, m in enumerate(matched)]
    if not task.is_head:  # a spanning engine's other nodes: its headless part
        return serve_headless(task, finished=lambda: not any(engine_todo(d, task.engine, task.engines)
                                                             for d in shards))
    comparator = TaskComparator(reward, task)
    try:
        for m, d in zip(matched, shards):
            work = lambda start, end, m=m: judge_matched(m[start:end], comparator, reward_kind(reward))
            code = run_shard_task(d, shard_bounds(len(m), d.count), work, stop, task.engine, task.engines)
            if code:
                return code
        return 0
    finally:
        comparator.close()


def rank_with_config(samples, reward, out_path: Optional[str | Path] = None) -> list[dict]:
    errors = reward_errors(reward)
    if errors:
        raise ConfigError(errors)
    comparator, close = open_comparator(reward)
    try:
        return rank_samples(samples, comparator, reward.aggregate, reward_kind(reward), out_path)
    finally:
        close()


def compare_main(argv: Optional[list[str]] = None) -> int:
    """`aipo-mp compare --config RECIPE --samples S --against BASELINE OUT ... [--shard-dir DIR]`:
    one comparator, every (baseline answers, judgments file) pair; with --shard-dir, one engine
    task of the placed compare stage (its shards only; `aipo-mp run` merges them into OUT)."""
    from aipo_mp.config import load_config
    from aipo_mp.rounds.shards import StopFlag

    parser = argparse.ArgumentParser(prog="aipo-mp compare")
    parser.add_argument("--config", required=True)
    parser.add_argument("--samples", required=True, help="the round's samples.jsonl (or scored.jsonl)")
    parser.add_argument("--against", nargs=2, action="append", required=True, metavar=("BASELINE", "OUT"),
                        help="baseline answers (samples JSONL) and the judgments JSONL to write")
    parser.add_argument("--shard-dir", default=None, help="one engine task of a placed stage: its shards here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    stop = StopFlag() if args.shard_dir else None  # a placed task: before the slow imports
    try:
        reward = load_config(args.config, args.overrides).reward
        errors = reward_errors(reward)
        if errors:
            raise ConfigError(errors)
        if args.shard_dir:
            return compare_task(args.samples, args.against, reward, args.shard_dir, stop)
        comparator, close = open_comparator(reward)
        try:
            for baseline, out in args.against:
                judgments = compare_answers(args.samples, baseline, comparator, reward_kind(reward), out)
                wins = [j["win"] for j in judgments]
                print(f"compared {len(wins)} answers with {baseline}: mean P(better) "
                      f"{sum(wins) / max(1, len(wins)):.4f}")
        finally:
            close()
    except UserError as e:
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["compare"]:
        print("usage: python -m aipo_mp.rounds.rankers compare --config RECIPE --samples S --against BASELINE OUT",
              file=sys.stderr)
        return 2
    return compare_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
