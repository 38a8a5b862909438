"""`aipo-mp eval RUN_DIR --questions FILE`: each chosen round's policy answers a benchmark's
questions, written in the benchmark's own answer format (aipo_mp/rounds/eval_formats.py), and,
with `--judge-url`, judged pairwise against a baseline answer file or another round
(aipo_mp/rounds/judge_client.py) into a raw and a length-controlled win rate (the estimator of
aipo_mp/rounds/report.py).

Sampling is the run's own sample stage (`aipo-mp sample --shard-dir`) with the recipe's engines,
placement and launcher (RUN_DIR/config.yaml), one answer per question (`sampling.n=1`; other
`sampling.*` overrides are passed on): each turn of each round is one stage whose finished shards
survive a kill, so a rerun resumes at the first unfinished shard. Layout (default OUT =
RUN_DIR/eval/FORMAT):

  OUT/eval_state.json              the question file's hash and the sampling settings (a rerun with others is refused)
  OUT/samples/roundR_turnT.jsonl   the sample stage's records of each turn
  OUT/shards/roundR_turnT/         finished shards of a stage under way
  OUT/<name>/model_outputs.json    alpaca_eval answers (name = RUN-roundR)
  OUT/model_answer/<name>.jsonl    arena_hard / mt_bench answers
  OUT/judgments/cache.jsonl        every judge request's reply (append-only; the resume point)
  OUT/judgments/<name>_vs_<baseline>.jsonl, OUT/results.json   per-question wins, win rates
  RUN_DIR/logs/eval_*-sample.log   the stages' logs
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from aipo_mp.errors import ConfigError
from aipo_mp.rounds import eval_formats as formats
from aipo_mp.runtime.files import atomic_write_json


@dataclasses.dataclass
class JudgeOptions:
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    rps: float = 2.0
    retries: int = 5
    baseline: Optional[str] = None  # an answer file in the benchmark's format
    baseline_round: Optional[int] = None  # or another round of the run
    extra_body: Optional[dict] = None  # JSON fields added to every judge request


def parse_rounds(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        rounds = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--rounds {text!r}: give round numbers separated by commas, e.g. 0,3") from None
    if not rounds or min(rounds) < 0:
        raise ConfigError(f"--rounds {text!r}: give round numbers >= 0 separated by commas, e.g. 0,3")
    return rounds


def open_run(run_dir: Path, overrides: list[str], launcher_kind: Optional[str]):
    """The run's RoundRunner (its recipe, state, launcher and placement) for the eval stages."""
    from aipo_mp.config import load_config
    from aipo_mp.errors import RUN_STATE
    from aipo_mp.rounds.launchers import make_launcher
    from aipo_mp.rounds.run import RoundRunner

    if not (run_dir / "config.yaml").is_file() or not (run_dir / RUN_STATE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml and {RUN_STATE}); give the "
                          "output.dir of an `aipo-mp run`")
    cfg = load_config(run_dir / "config.yaml", ["sampling.n=1", *overrides])
    cfg.output.dir = str(run_dir)
    world = max(1, cfg.cluster.nproc_per_node) * max(1, cfg.cluster.nodes)
    launcher = make_launcher(launcher_kind or cfg.cluster.launcher, task_wait_s=cfg.cluster.task_wait_s)
    return RoundRunner(cfg, run_dir / "config.yaml", launcher, world)


def round_policies(runner, wanted: Optional[list[int]]) -> dict[int, str]:
    """{round: HF directory} of the rounds whose policy vLLM can load (the trainer's handoff, an
    export, or an HF starting point)."""
    found = {}
    for key, policy in sorted(runner.state.data.get("policies", {}).items(), key=lambda kv: int(kv[0])):
        r = int(key)
        hf = runner.run_dir / f"round_{r}" / "policy_hf"  # the handoff or an export (the checkpoint may be pruned)
        if not (hf / "config.json").is_file():
            hf = Path(policy)  # an HF starting point
        if (hf / "config.json").is_file():
            found[r] = str(hf)
    if wanted is None:
        if not found:
            raise ConfigError(f"{runner.run_dir}: no round has an HF policy directory yet; run `aipo-mp run` first")
        return found
    missing = [r for r in wanted if r not in found]
    if missing:
        raise ConfigError(f"--rounds: round(s) {missing} of {runner.run_dir} have no HF policy directory "
                          f"(rounds with one: {sorted(found)}); export it with `aipo-mp convert mcore-to-hf` into "
                          "round_R/policy_hf or choose other rounds")
    return {r: found[r] for r in wanted}


def check_eval_state(out: Path, questions_path: Path, sampling: dict) -> None:
    """OUT belongs to one question file and one set of sampling settings."""
    state = {"questions": str(questions_path), "questions_sha256": formats.file_sha256(questions_path),
             "sampling": sampling}
    path = out / "eval_state.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("questions_sha256") != state["questions_sha256"] or old.get("sampling") != sampling:
            what = "question file" if old.get("questions_sha256") != state["questions_sha256"] else "sampling settings"
            raise ConfigError(f"{out} holds answers made with another {what}; give --out NEW_DIR (or delete {out})")
        return
    atomic_write_json(path, state)


def sample_turn(runner, out: Path, r: int, hf_dir: str, turn: int, prompts: list[dict], fmt: str,
                overrides: list[str]) -> list[dict]:
    """One eval sample stage (resumable by its shards); returns its records."""
    from aipo_mp.data.records import read_jsonl, write_jsonl
    from aipo_mp.rounds.progress import shard_probe
    from aipo_mp.rounds.shards import ShardDir, shard_count

    tag = f"round{r}_turn{turn + 1}"
    samples = out / "samples" / f"{tag}.jsonl"
    if samples.exists():
        return read_jsonl(samples)
    prompts_path = out / "prompts" / f"{tag}.jsonl"
    write_jsonl(prompts_path, prompts)
    name = f"eval_{fmt}_{tag}-sample"
    placement = runner.placement(name)
    per_shard = runner.cfg.sampling.shard_prompts
    shard_root = out / "shards" / tag
    shards = ShardDir(shard_root, shard_count(len(prompts), placement.ntasks, per_shard))
    shards.write_plan()  # the unfinished shards the tasks split (finished ones survive a kill)
    runner.probes = {name: shard_probe(shard_root)}  # the console's progress line
    runner.launch(name, ["--config", str(runner.config_path), "--model", hf_dir, "--prompts", str(prompts_path),
                         "--shard-dir", str(shard_root), "--shard-prompts", str(per_shard), "sampling.n=1",
                         *overrides], placement)
    records = shards.merge()
    if len(records) != len(prompts):
        raise RuntimeError(f"{shard_root}: {len(records)} samples for {len(prompts)} prompts")
    write_jsonl(samples, records)
    return records


def answer_round(runner, out: Path, fmt: str, questions: list[dict], r: int, hf_dir: str,
                 model: str, overrides: list[str]) -> Path:
    path = formats.answer_path(out, fmt, model)
    if path.exists():
        print(f"[aipo-mp eval] round {r}: answers already written ({path})", flush=True)
        return path
    turns: list[list[dict]] = []
    for t in range(max(len(q["turns"]) for q in questions)):
        prompts = formats.turn_prompts(questions, t, turns)
        turns.append(sample_turn(runner, out, r, hf_dir, t, prompts, fmt, overrides))
    formats.write_answers(path, fmt, formats.format_answers(fmt, model, questions, turns))
    print(f"[aipo-mp eval] round {r}: wrote {path}", flush=True)
    return path


def evaluate(run_dir: str | Path, questions_path: str | Path, fmt: Optional[str] = None,
             rounds: Optional[list[int]] = None, out: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
             launcher_kind: Optional[str] = None, judge: Optional[JudgeOptions] = None) -> dict:
    """Answer files of each round (and judge results); returns {"answers": {round: path}, "results": [...]}."""
    from aipo_mp.runtime.locks import hold_lock

    run_dir, questions_path = Path(run_dir).absolute(), Path(questions_path).absolute()
    overrides = list(overrides or [])
    bad = [o for o in overrides if not o.startswith("sampling.")]
    if bad:
        raise ConfigError(f"eval overrides {bad}: only sampling.* settings apply to eval (e.g. sampling.max_tokens=2048)")
    fmt, questions = formats.read_questions(questions_path, fmt)
    runner = open_run(run_dir, overrides, launcher_kind)
    if judge is not None and judge.baseline_round is not None and rounds is not None \
            and judge.baseline_round not in rounds:
        rounds = sorted({*rounds, judge.baseline_round})
    policies = round_policies(runner, rounds)
    if judge is not None:  # the judge's settings and baseline file are checked before any sampling
        from aipo_mp.rounds.judge_client import JudgeClient

        JudgeClient(judge.url, judge.model, judge.api_key_env, judge.rps, judge.retries)
        if judge.baseline:
            formats.read_answers(judge.baseline, fmt)
    if judge is not None and not judge.baseline and len(policies) < 2:
        raise ConfigError(f"--judge-url: only round {min(policies)} is chosen, nothing to judge it against; give "
                          "--baseline FILE, --baseline-round R or more --rounds")
    out = Path(out).absolute() if out else run_dir / "eval" / fmt
    with hold_lock(out, "aipo-mp eval"):
        check_eval_state(out, questions_path, dataclasses.asdict(runner.cfg.sampling))
        answers = {r: answer_round(runner, out, fmt, questions, r, hf, model_name(run_dir, r), overrides)
                   for r, hf in policies.items()}
        results = judge_rounds(out, fmt, questions, answers, run_dir, judge) if judge else []
    return {"format": fmt, "answers": {r: str(p) for r, p in answers.items()}, "results": results}


def model_name(run_dir: Path, r: int) -> str:
    return f"{run_dir.name}-round{r}"


# ---------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------


def judge_items(fmt: str, questions: list[dict], answers: dict, baseline: dict) -> list[dict]:
    """{"question_key", "question", "answer", "baseline"} per question both sides answered; a
    multi-turn question shows every turn (the conversation as a whole is judged)."""
    items = []
    for q in questions:
        key = formats.question_key(fmt, q)
        mine, theirs = answers.get(key), baseline.get(key)
        if mine is None or theirs is None:
            continue
        items.append({"question_key": key, "question": join_turns(q["turns"]), "answer": join_turns(mine),
                      "baseline": join_turns(theirs)})
    return items


def join_turns(turns: list[str]) -> str:
    if len(turns) == 1:
        return turns[0]
    return "\n\n".join(f"(turn {k + 1}) {t}" for k, t in enumerate(turns))


def judge_rounds(out: Path, fmt: str, questions: list[dict], answers: dict, run_dir: Path,
                 judge: JudgeOptions) -> list[dict]:
    from aipo_mp.rounds.judge_client import JudgeClient, JudgmentCache, judge_pairs
    from aipo_mp.rounds.report import length_controlled_win_rate

    if judge.baseline:
        base_name, baseline = Path(judge.baseline).stem, formats.read_answers(judge.baseline, fmt)
        candidates = list(answers)
    else:
        ref = judge.baseline_round if judge.baseline_round is not None else min(answers)
        base_name, baseline = model_name(run_dir, ref), formats.read_answers(answers[ref], fmt)
        candidates = [r for r in answers if r != ref]
    client = JudgeClient(judge.url, judge.model, judge.api_key_env, judge.rps, judge.retries,
                         extra_body=judge.extra_body)
    cache = JudgmentCache(out / "judgments" / "cache.jsonl")
    results = []
    for r in candidates:
        name = model_name(run_dir, r)
        items = judge_items(fmt, questions, formats.read_answers(answers[r], fmt), baseline)
        if not items:
            raise ConfigError(f"--baseline {base_name}: answers none of the questions; give answers to the same "
                              "question file")
        pair = f"{name}|{base_name}"
        judgments = judge_pairs(items, pair, client, cache, progress=progress_line(f"judge {name} vs {base_name}"))
        from aipo_mp.data.records import write_jsonl

        write_jsonl(out / "judgments" / f"{name}_vs_{base_name}.jsonl", judgments)
        lc = length_controlled_win_rate(judgments)
        results.append({"round": r, "model": name, "baseline": base_name, "n": len(judgments),
                        "win_rate": lc["win_rate"], "lc_win_rate": lc["lc_win_rate"],
                        "invalid_verdicts": sum(j["invalid"] for j in judgments),
                        "verdicts": 2 * len(judgments), "judge_model": judge.model})
    print(f"[aipo-mp eval] judge: {client.sent} request(s) sent, {cache.hits} answered from the cache "
          f"({cache.path})", flush=True)
    atomic_write_json(out / "results.json", {"judge_model": judge.model, "requests_sent": client.sent,
                                             "cache_hits": cache.hits, "rows": results})
    return results


def progress_line(what: str):
    """A one-line console progress (rewritten in place on a terminal, every 10% otherwise)."""
    import sys

    tty = sys.stdout.isatty()
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if tty:
            print(f"\r[aipo-mp eval] {what}: {done}/{total}", end="\n" if done == total else "", flush=True)
        elif pct // 10 != last[0] // 10 or done == total:
            print(f"[aipo-mp eval] {what}: {done}/{total}", flush=True)
        last[0] = pct

    return show


def results_table(results: list[dict]) -> str:
    from aipo_mp.rounds.report import markdown_table

    cols = ["round", "baseline", "n", "win_rate", "lc_win_rate", "invalid_verdicts"]
    return markdown_table(results, cols)
