"""`aipo-mp eval`'s pure parts: benchmark question files in (and the one-line error for a bad
one), answer files out with the fields the benchmarks' own tools read, MT-Bench's second turn as a
conversation, the judge's verdict parsing, its HTTP retries/backoff/rate against a local HTTP
server, the judgment cache, and the end-of-run console table.

The answer fields were checked against (2026-12-04): alpaca-eval 0.6.6 from the registry
(installed in a scratch venv: `utils.load_or_convert_to_dataframe` reads model_outputs.json with
pandas, `utils.get_generator_name` takes the single `generator`, the pairwise annotator's primary
key is `instruction` and it reads `output`; its `evaluate_from_model` keeps the columns dataset,
instruction, output, generator), FastChat llm_judge's gen_model_answer.py (MT-Bench: choices[].turns
are strings) and Arena-Hard-Auto v0.1's gen_answer.py (choices[].turns are {"content"} objects,
conv_metadata.token_len)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from aipo_mp.errors import ConfigError, DataError
from aipo_mp.rounds import eval_formats as formats
from aipo_mp.rounds.judge_client import JudgeClient, JudgmentCache, judge_pairs, order_win, parse_verdict

ALPACA_FIELDS = {"instruction", "output", "generator"}  # + dataset when the eval set has it
ANSWER_FIELDS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}


def write(path, text):
    path.write_text(text)
    return path


def samples(questions, texts):
    return [{"prompt_id": q["id"], "text": t, "num_tokens": len(t.split()) + 1} for q, t in zip(questions, texts)]


def test_alpaca_eval_questions_and_answers(tmp_path):
    q = write(tmp_path / "eval.json", json.dumps([{"instruction": "Name a colour.", "dataset": "helpful_base"},
                                                  {"instruction": "Say hi.", "output": "ref", "generator": "gpt4"}]))
    fmt, questions = formats.read_questions(q)
    assert fmt == "alpaca_eval" and [x["turns"] for x in questions] == [["Name a colour."], ["Say hi."]]
    out = formats.format_answers(fmt, "run-round1", questions, [samples(questions, [" red ", "hi"])])
    assert set(out[0]) == ALPACA_FIELDS | {"dataset"} and set(out[1]) == ALPACA_FIELDS
    assert out[0] == {"instruction": "Name a colour.", "output": "red", "generator": "run-round1",
                      "dataset": "helpful_base"}
    path = formats.answer_path(tmp_path, fmt, "run-round1")
    formats.write_answers(path, fmt, out)
    assert path.name == "model_outputs.json" and json.loads(path.read_text()) == out
    assert formats.read_answers(path, fmt) == {"Name a colour.": ["red"], "Say hi.": ["hi"]}


def test_arena_hard_questions_and_answers(tmp_path):
    q = write(tmp_path / "question.jsonl", "".join(json.dumps(
        {"question_id": f"id{k}", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": f"q{k}"}]}) + "\n"
        for k in range(2)))
    fmt, questions = formats.read_questions(q)
    assert fmt == "arena_hard" and [x["id"] for x in questions] == ["id0", "id1"]
    out = formats.format_answers(fmt, "m", questions, [samples(questions, ["a0", "a1 b"])], tstamp=1.0)
    assert set(out[0]) == ANSWER_FIELDS | {"conv_metadata"}
    assert out[1]["choices"] == [{"index": 0, "turns": [{"content": "a1 b"}]}]
    assert out[1]["conv_metadata"] == {"token_len": 3} and out[1]["model_id"] == "m"
    assert formats.answer_path(tmp_path, fmt, "m") == tmp_path / "model_answer" / "m.jsonl"
    again = formats.format_answers(fmt, "m", questions, [samples(questions, ["x", "y"])], tstamp=2.0)
    assert [a["answer_id"] for a in again] == [a["answer_id"] for a in out]  # deterministic per (model, question)
    assert len({a["answer_id"] for a in out}) == 2


def test_mt_bench_second_turn_is_the_conversation(tmp_path):
    q = write(tmp_path / "question.jsonl", json.dumps({"question_id": 81, "category": "writing",
                                                       "turns": ["First?", "And then?"]}) + "\n")
    fmt, questions = formats.read_questions(q)
    assert fmt == "mt_bench"
    first = formats.turn_prompts(questions, 0, [])
    assert first == [{"id": 81, "prompt": "First?"}]
    turn1 = samples(questions, ["answer one"])
    second = formats.turn_prompts(questions, 1, [turn1])
    assert second == [{"id": 81, "prompt": [{"role": "user", "content": "First?"},
                                            {"role": "assistant", "content": "answer one"},
                                            {"role": "user", "content": "And then?"}]}]
    out = formats.format_answers(fmt, "m", questions, [turn1, samples(questions, ["answer two"])])
    assert set(out[0]) == ANSWER_FIELDS and "conv_metadata" not in out[0]
    assert out[0]["choices"] == [{"index": 0, "turns": ["answer one", "answer two"]}]  # plain strings (FastChat)
    path = tmp_path / "a.jsonl"
    formats.write_answers(path, fmt, out)
    assert formats.read_answers(path, fmt) == {"81": ["answer one", "answer two"]}


@pytest.mark.parametrize("name,text,fmt,where", [
    ("empty.json", "[]", None, "holds no questions"),
    ("noinstr.json", json.dumps([{"instruction": "ok"}, {"prompt": "x"}]), None, "[1]: missing or empty field 'instruction'"),
    ("broken.jsonl", '{"question_id": 1, "turns": ["a"]}\n{"question_id": 2,\n', None, ":2: not valid JSON"),
    ("noid.jsonl", json.dumps({"turns": ["a"]}) + "\n", "mt_bench", ":1: missing field 'question_id'"),
    ("dup.jsonl", (json.dumps({"question_id": 1, "turns": ["a"]}) + "\n") * 2, None, "question id 1 already used"),
    ("badturns.jsonl", json.dumps({"question_id": 1, "turns": [{"x": 1}]}) + "\n", "arena_hard", ":1: expected 'turns'"),
    ("list.json", json.dumps([{"instruction": "a"}]), "mt_bench", "is a JSON list, not the mt_bench question format"),
])
def test_bad_question_files_are_one_line(tmp_path, name, text, fmt, where):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as e:
        formats.read_questions(path, fmt)
    assert len(e.value.errors) == 1 and str(path) in e.value.errors[0] and where in e.value.errors[0]
    assert "; give " in e.value.errors[0]  # says how to fix it
    with pytest.raises(DataError, match="file not found"):
        formats.read_questions(tmp_path / "missing.json")


@pytest.mark.parametrize("reply,verdict", [
    ("A", "A"), (" B.", "B"), ("**A**", "A"), ("Answer: B", "B"), ("The better answer is A.", "A"),
    ("[[B]]", "B"), ("I think [[A]] wins", "A"), ("Response B is clearer", "B"), ('"a"', None),
    ("paper", None), ("", None), ("A or B", None), ("Both are fine", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_order_win_flips_with_the_order():
    assert [order_win(v, "ab") for v in ("A", "B", None)] == [1.0, 0.0, 0.5]
    assert [order_win(v, "ba") for v in ("A", "B", None)] == [0.0, 1.0, 0.5]


class Endpoint(http.server.BaseHTTPRequestHandler):
    """A local OpenAI-style endpoint whose answers the test scripts: (status, body, headers)."""

    script: list = []
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Endpoint.seen.append({"body": body, "auth": self.headers.get("Authorization")})
        status, reply, headers = Endpoint.script.pop(0) if Endpoint.script else (200, "A", {})
        data = json.dumps({"choices": [{"message": {"content": reply}}]} if status == 200 else {"error": reply}).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Endpoint.script, Endpoint.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_client_retries_backs_off_and_paces(endpoint, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-secret-123")
    sleeps = []
    client = JudgeClient(endpoint, "j", api_key_env="JUDGE_KEY_FOR_TEST", rps=1000, retries=3,
                         extra_body={"structured_outputs": {"choice": ["A", "B"]}}, sleep=sleeps.append)
    Endpoint.script = [(503, "busy", {}), (429, "slow down", {"Retry-After": "7"}), (200, "B", {})]
    assert client.complete("which?") == "B"
    assert sleeps[:1] == [1.0] and 7.0 in sleeps  # backoff 1 s, then the server's Retry-After
    assert client.sent == 1 and len(Endpoint.seen) == 3
    assert Endpoint.seen[-1]["auth"] == "Bearer sk-secret-123"
    assert Endpoint.seen[-1]["body"]["structured_outputs"] == {"choice": ["A", "B"]}
    assert Endpoint.seen[-1]["body"]["messages"] == [{"role": "user", "content": "which?"}]

    Endpoint.script = [(401, "bad key", {})]
    with pytest.raises(ConfigError) as e:
        client.complete("x")
    assert "HTTP 401" in str(e.value) and "sk-secret" not in str(e.value) and "$JUDGE_KEY_FOR_TEST" in str(e.value)

    Endpoint.script = [(500, "down", {})] * 4
    with pytest.raises(Exception, match="did not answer after 4 tries") as e:
        client.complete("x")
    assert "sk-secret" not in str(e.value)

    paced = JudgeClient(endpoint, "j", rps=2.0, sleep=sleeps.append)
    sleeps.clear()
    for _ in range(3):
        paced.complete("x")
    assert len(sleeps) == 2 and all(0.3 < s <= 0.5 for s in sleeps)  # at most 2 requests started per second


def test_judgment_cache_resumes_and_skips_a_torn_line(endpoint, tmp_path):
    items = [{"question_key": f"q{k}", "question": f"q{k}?", "answer": "a" * (k + 1), "baseline": "bb"}
             for k in range(3)]
    client = JudgeClient(endpoint, "j", rps=1000)
    Endpoint.script = [(200, v, {}) for v in ("A", "A", "B", "A", "maybe", "B")]
    cache = JudgmentCache(tmp_path / "cache.jsonl")
    first = judge_pairs(items, "m|base", client, cache)
    assert client.sent == 6 and [j["win"] for j in first] == [0.5, 0.0, 0.75]  # q2: invalid 'maybe' is a tie
    assert [j["invalid"] for j in first] == [0, 0, 1]
    assert [(j["length"], j["baseline_length"]) for j in first] == [(1, 2), (2, 2), (3, 2)]
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"question": "q9", "pai')  # a kill mid-write
    again = JudgeClient(endpoint, "j", rps=1000)
    cache2 = JudgmentCache(tmp_path / "cache.jsonl")
    assert judge_pairs(items, "m|base", again, cache2) == first and again.sent == 0 and cache2.hits == 6
    items[1]["answer"] = "changed"  # a changed answer is judged again, in both orders
    judge_pairs(items, "m|base", again, cache2)
    assert again.sent == 2


def test_console_summary_is_compact():
    from pathlib import Path

    from aipo_mp.rounds.report import console_summary

    rows = [{"round": 0, "mean_reward": 0.1, "pairs": 12, "kl_to_initial": 0.0, "win_rate_vs_round0": None,
             "lc_win_rate_vs_round0": None, "mean_length": 5.0},
            {"round": 1, "mean_reward": 0.25, "pairs": None, "kl_to_initial": 1.5, "win_rate_vs_round0": 0.75,
             "lc_win_rate_vs_round0": 0.6, "mean_length": 6.0}]
    text = console_summary(rows, Path("RUN/report/report.md"))
    lines = text.splitlines()
    assert lines[0].split() == ["round", "mean", "reward", "pairs", "KL", "win", "rate", "LC", "win", "rate"]
    assert lines[2].split() == ["0", "0.1000", "12", "0.0000", "-", "-"]
    assert lines[3].split() == ["1", "0.2500", "-", "1.5000", "0.750", "0.600"]
    assert lines[-1].endswith("RUN/report/report.md") and "mean_length" not in text
    assert max(len(l) for l in lines[:4]) < 80


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from aipo_mp.cli import main

    (tmp_path / "round_0").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "not a run directory" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0"]  # nothing written


def test_stage_progress_counts_shards_and_steps(tmp_path, capsys):
    import time

    from aipo_mp.rounds.progress import shard_probe, stage_progress, steps_probe

    root = tmp_path / "shards"
    assert shard_probe(root)() is None
    (root / "of4").mkdir(parents=True)
    (root / "of4" / "shard_00000.json").write_text("{}")
    (root / "of4" / "shard_00000.jsonl").write_text("")
    assert shard_probe(root)() == (1, 4, "shards")
    metrics = tmp_path / "metrics.jsonl"
    assert steps_probe(metrics, 16)() is None
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    assert steps_probe(metrics, 16)() == (2, 16, "steps")
    with stage_progress("round0-train", steps_probe(metrics, 16), every_s=0.05, poll_s=0.05):
        time.sleep(0.3)
        metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
        time.sleep(0.3)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[aipo-mp run] round0-train: 2/16 steps", "[aipo-mp run] round0-train: 3/16 steps"]
