"""Evaluation and tracking on one real tiny `aipo-mp run` (one round, the final policy sampled,
W&B offline):

- the run's W&B offline runs hold the trainer's step metrics (equal to metrics.jsonl) and each
  round's report row (equal to report.json) and the plots; the console ends with the compact table;
- `aipo-mp eval` writes AlpacaEval, Arena-Hard and MT-Bench answer files with the fields their
  readers take (tests/unit/test_eval_formats.py says where the field lists come from), MT-Bench's
  second turn answered inside the conversation; a bad question file is one line, nothing written;
- judging round 1 against round 0 through a real `vllm serve` of a tiny model on localhost (one
  server for the module): both orders requested, a kill mid-way and a rerun sends only the
  uncached requests (counted by the server's own metrics), and the win rates are the ones the
  cached verdicts give."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch

RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny.yaml"
ALPACA = [{"instruction": f"name {k + 2} colors", "dataset": "colors"} for k in range(6)]
ARENA = [{"question_id": f"q{k}", "category": "arena-hard-v0.1", "cluster": "c",
          "turns": [{"content": f"give me {k + 1} colors"}]} for k in range(3)]
MT_BENCH = [{"question_id": 81 + k, "category": "writing", "turns": [f"name {k + 1} colors", "now two more"]}
            for k in range(2)]

pytestmark = pytest.mark.slow


def env(tmp: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_SILENT="true",
                WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
                WANDB_DATA_DIR=str(tmp / "wandb_data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def policy(base) -> Path:
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(base / "tokenizer", vocab_size=512)
    return save_hf_model(tiny_arch("llama"), base / "policy", seed=0, tokenizer_dir=tok)


@pytest.fixture(scope="module")
def judge_server(base, policy):
    """`vllm serve` of the tiny policy (as the judge), started at once so that it loads while the
    run trains; the judge test waits for it."""
    port = free_port()
    log = open(base / "vllm_serve.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "vllm_serve.py"), "serve", str(policy),
                             "--port", str(port), "--served-model-name", "judge", "--enforce-eager",
                             "--max-model-len", "1024"], cwd=base, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(env(base), VLLM_CPU_KVCACHE_SPACE="1"), start_new_session=True)
    yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": base / "vllm_serve.log"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()


@pytest.fixture(scope="module")
def run(base, policy, judge_server) -> dict:
    from aipo_mp.demo import task as demo_task

    prompts = demo_task.write_prompts(base / "prompts.jsonl", n=8, seed=0)
    run_dir = base / "run"
    cmd = [sys.executable, "-m", "aipo_mp.cli", "run", str(RECIPE), f"model.path={policy}", f"rounds.prompts={prompts}",
           f"output.dir={run_dir}", "rounds.num_rounds=1", "reward.rule=tests.rules:length_reward", "pairs.min_gap=0.0",
           "pairs.allow_truncated=true", "train.steps=2", "train.save_every=2", "train.global_batch_pairs=4",
           "sampling.n=2", "sampling.max_tokens=8", "rounds.kl_estimate=false",
           "output.wandb.project=aipo-test", "output.wandb.mode=offline"]
    done = subprocess.run(cmd, cwd=ROOT, env=env(base), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"dir": run_dir, "stdout": done.stdout}


def eval_cmd(run_dir: Path, questions: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aipo_mp.cli", "eval", str(run_dir), "--questions", str(questions), "--out", str(out),
            *extra, "sampling.max_tokens=8"]


def test_wandb_offline_run_holds_metrics_and_round_rows(run):
    from aipo_mp.runtime.tracking import offline_history

    run_dir = run["dir"]
    steps = [json.loads(l) for l in (run_dir / "round_0" / "train" / "metrics.jsonl").read_text().splitlines()]
    # Two training ranks (TP=2), one W&B run: only global rank 0 logs.
    assert len(list((run_dir / "round_0" / "train" / "wandb").glob("offline-run-*"))) == 1
    logged = [h for h in offline_history(run_dir / "round_0" / "train" / "wandb") if "train/loss" in h]
    assert [h["_step"] for h in logged] == [s["step"] for s in steps] == [1, 2]
    for h, s in zip(logged, steps):
        for k, v in s.items():
            if k != "step" and isinstance(v, float):
                assert h[f"train/{k}"] == v, k
    rows = json.loads((run_dir / "report" / "report.json").read_text())
    history = offline_history(run_dir / "wandb")
    logged_rows = [h for h in history if "round/round" in h]
    assert [h["round/round"] for h in logged_rows] == [r["round"] for r in rows] == [0, 1]
    for h, r in zip(logged_rows, rows):
        for k in ("mean_reward", "mean_length", "win_rate_vs_round0", "lc_win_rate_vs_round0", "pairs"):
            assert h.get(f"round/{k}") == r[k], k
    images = {k.split("/")[1] for h in history for k, v in h.items() if k.endswith("/_type") and v == "image-file"}
    assert images == {"reward", "length", "agreement", "kl", "win_rate"}
    # The console ends with the compact table and the path of report.md.
    tail = run["stdout"].strip().splitlines()[-6:]
    assert tail[0].split()[:3] == ["round", "mean", "reward"] and tail[-1].endswith(str(run_dir / "report" / "report.md"))


@pytest.fixture(scope="module")
def alpaca(base, run) -> dict:
    questions = base / "alpaca_eval.json"
    questions.write_text(json.dumps(ALPACA))
    out = base / "eval_alpaca"
    done = subprocess.run(eval_cmd(run["dir"], questions, out, "--rounds", "0,1"), cwd=ROOT, env=env(base),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"questions": questions, "out": out}


def test_eval_writes_the_benchmarks_answer_files(base, run, alpaca):
    name = run["dir"].name
    for r in (0, 1):
        outputs = json.loads((alpaca["out"] / f"{name}-round{r}" / "model_outputs.json").read_text())
        assert [o["instruction"] for o in outputs] == [q["instruction"] for q in ALPACA]
        assert all(set(o) == {"instruction", "output", "generator", "dataset"} and o["generator"] == f"{name}-round{r}"
                   and isinstance(o["output"], str) for o in outputs)
    samples = [json.loads(l) for l in (alpaca["out"] / "samples" / "round1_turn1.jsonl").read_text().splitlines()]
    assert [s["text"].strip() for s in samples] == [o["output"] for o in outputs]

    arena_q, mt_q = base / "arena_question.jsonl", base / "mt_question.jsonl"
    arena_q.write_text("".join(json.dumps(q) + "\n" for q in ARENA))
    mt_q.write_text("".join(json.dumps(q) + "\n" for q in MT_BENCH))
    for questions, fmt in ((arena_q, "arena_hard"), (mt_q, "mt_bench")):
        out = base / f"eval_{fmt}"
        done = subprocess.run(eval_cmd(run["dir"], questions, out, "--rounds", "1", "--format", fmt), cwd=ROOT,
                              env=env(base), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = [json.loads(l) for l in (out / "model_answer" / f"{name}-round1.jsonl").read_text().splitlines()]
        source = ARENA if fmt == "arena_hard" else MT_BENCH
        assert [a["question_id"] for a in lines] == [q["question_id"] for q in source]
        for a, q in zip(lines, source):
            assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= set(a)
            assert a["model_id"] == f"{name}-round1" and a["choices"][0]["index"] == 0
            turns = a["choices"][0]["turns"]
            assert len(turns) == len(q["turns"])
            if fmt == "arena_hard":
                assert all(set(t) == {"content"} and isinstance(t["content"], str) for t in turns)
                assert isinstance(a["conv_metadata"]["token_len"], int)
            else:
                assert all(isinstance(t, str) for t in turns)
    # MT-Bench's second turn was sampled with the first question and the policy's own answer before it.
    first = {s["prompt_id"]: s for s in map(json.loads, (base / "eval_mt_bench" / "samples" / "round1_turn1.jsonl")
                                             .read_text().splitlines())}
    for s in map(json.loads, (base / "eval_mt_bench" / "samples" / "round1_turn2.jsonl").read_text().splitlines()):
        q = next(q for q in MT_BENCH if q["question_id"] == s["prompt_id"])
        assert s["prompt"] == [{"role": "user", "content": q["turns"][0]},
                               {"role": "assistant", "content": first[s["prompt_id"]]["text"]},
                               {"role": "user", "content": q["turns"][1]}]

    bad = base / "bad_question.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "turns": ["a"]}) + "\n{not json\n")
    done = subprocess.run(eval_cmd(run["dir"], bad, base / "eval_bad"), cwd=ROOT, env=env(base),
                          capture_output=True, text=True)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and f"{bad}:2" in err[0], done.stderr
    assert not (base / "eval_bad").exists()


def served_requests(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("vllm:request_success_total"))


def wait_ready(server, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server["proc"].poll() is None, server["log"].read_text()[-3000:]
        try:
            urllib.request.urlopen(server["url"] + "/v1/models", timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError("vllm serve did not become ready: " + server["log"].read_text()[-3000:])


def test_judge_through_vllm_serve_resumes_from_its_cache(base, run, alpaca, judge_server):
    from aipo_mp.rounds.judge_client import order_win
    from aipo_mp.rounds.report import length_controlled_win_rate

    wait_ready(judge_server)
    out = alpaca["out"]
    cmd = eval_cmd(run["dir"], alpaca["questions"], out, "--rounds", "0,1", "--judge-url", judge_server["url"] + "/v1",
                   "--judge-model", "judge", "--judge-rps", "4", "--judge-api-key-env", "AIPO_TEST_JUDGE_KEY",
                   "--judge-extra-body", json.dumps({"structured_outputs": {"choice": ["A", "B"]}}))
    judge_env = dict(env(base), AIPO_TEST_JUDGE_KEY="sk-test-never-written")
    cache = out / "judgments" / "cache.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=judge_env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (cache.exists() and len(cache.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the judge never started writing its cache"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # a request in flight at the kill finishes on the server
    cached = len([l for l in cache.read_text().splitlines() if l.endswith("}")])
    total = 2 * len(ALPACA)  # every question in both orders
    assert 3 <= cached < total
    before = served_requests(judge_server["url"])
    done = subprocess.run(cmd, cwd=ROOT, env=judge_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sent = int(re.search(r"judge: (\d+) request\(s\) sent, (\d+) answered from the cache", done.stdout).group(1))
    assert sent == total - cached and served_requests(judge_server["url"]) - before == sent

    entries = [json.loads(l) for l in cache.read_text().splitlines()]
    assert len(entries) == total and {(e["question"], e["order"]) for e in entries} == {
        (q["instruction"], o) for q in ALPACA for o in ("ab", "ba")}
    assert all(e["verdict"] in ("A", "B") for e in entries)  # constrained to one letter by the extra body
    results = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["round"], r["n"], r["invalid_verdicts"]) for r in results] == [(1, len(ALPACA), 0)]
    ours = {o["instruction"]: o["output"] for o in json.loads((out / f"{run['dir'].name}-round1" / "model_outputs.json")
                                                                 .read_text())}
    theirs = {o["instruction"]: o["output"] for o in json.loads((out / f"{run['dir'].name}-round0" / "model_outputs.json")
                                                                   .read_text())}
    judgments = [{"win": sum(order_win(e["verdict"], e["order"]) for e in entries if e["question"] == q) / 2,
                  "length": len(ours[q]), "baseline_length": len(theirs[q])} for q in ours]
    want = length_controlled_win_rate(judgments)
    assert results[0]["win_rate"] == pytest.approx(want["win_rate"], abs=1e-12)
    assert results[0]["lc_win_rate"] == pytest.approx(want["lc_win_rate"], abs=1e-12)
    for path in out.rglob("*"):  # the API key never reaches a file
        if path.is_file():
            assert b"sk-test-never-written" not in path.read_bytes(), path
    assert "sk-test-never-written" not in done.stdout + done.stderr
