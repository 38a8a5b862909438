"""Benchmark question files in, benchmark answer files out (`aipo-mp eval`): pure functions, no
engines. The formats, as their own tools read and write them:

- **alpaca_eval** (AlpacaEval 2.0): questions are a JSON list of {"instruction", ["dataset", ...]}
  (the 805-instruction eval set); answers are `model_outputs.json`, a JSON list of
  {"instruction", "output", "generator", ["dataset"]} in the questions' order. The `alpaca-eval`
  0.6.6 reader (`utils.load_or_convert_to_dataframe` + `get_generator_name`) loads it with pandas,
  takes the model name from the single `generator` value, and its pairwise annotator needs the
  primary key `instruction` and the `output` column.
- **arena_hard** (Arena-Hard-Auto v0.1): questions are JSONL {"question_id", "category",
  "turns": [{"content"}]}; answers are `model_answer/<model>.jsonl` lines {"question_id",
  "answer_id", "model_id", "choices": [{"index": 0, "turns": [{"content"}]}], "tstamp",
  "conv_metadata": {"token_len"}} as its gen_answer.py writes them (token_len counts the policy's
  tokens here, not tiktoken's).
- **mt_bench** (FastChat llm_judge): questions are JSONL {"question_id", "category", "turns":
  [str, str]}; answers are `model_answer/<model>.jsonl` lines {"question_id", "answer_id",
  "model_id", "choices": [{"index": 0, "turns": [str, str]}], "tstamp"}: turns are plain strings
  there. The second turn is answered with the first question and the policy's own first answer in
  the conversation.

A question becomes {"id", "turns": [str, ...], "extra": {fields copied to the answer}}."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from aipo_mp.errors import DataError

FORMATS = ("alpaca_eval", "arena_hard", "mt_bench")
HINT = {
    "alpaca_eval": 'a JSON list of {"instruction": "..."} objects (AlpacaEval\'s eval set)',
    "arena_hard": 'JSONL of {"question_id": ..., "turns": [{"content": "..."}]} (Arena-Hard\'s question.jsonl)',
    "mt_bench": 'JSONL of {"question_id": ..., "turns": ["...", "..."]} (MT-Bench\'s question.jsonl)',
}


def bad(path: Path, where: str, what: str, fmt: Optional[str]) -> DataError:
    want = HINT[fmt] if fmt else "AlpacaEval JSON, or Arena-Hard / MT-Bench question.jsonl"
    return DataError(f"--questions {path}{where}: {what}; give {want}")


def read_question_objects(path: Path) -> tuple[str, list]:
    """('json', list) for a JSON list file, ('jsonl', [(line, obj)]) for JSONL."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"--questions {path}: file not found; give the benchmark's question file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--questions {path}: cannot be read ({e}); give a UTF-8 JSON or JSONL file") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return "json", json.loads(text)
        except ValueError as e:
            raise bad(path, "", f"not valid JSON ({e})", "alpaca_eval") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except ValueError as e:
            raise bad(path, f":{n}", f"not valid JSON ({e.msg})", None) from None
    return "jsonl", rows


def detect_format(kind: str, items: list) -> str:
    if kind == "json":
        return "alpaca_eval"
    first = items[0][1] if items else None
    turns = first.get("turns") if isinstance(first, dict) else None
    if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
        return "mt_bench"
    return "arena_hard"


def read_questions(path: str | Path, fmt: Optional[str] = None) -> tuple[str, list[dict]]:
    """(format, questions) of a benchmark question file; `fmt` None: detected from the file."""
    path = Path(path)
    kind, items = read_question_objects(path)
    fmt = fmt or detect_format(kind, items)
    if (kind == "json") != (fmt == "alpaca_eval"):
        raise bad(path, "", f"is {'a JSON list' if kind == 'json' else 'JSON lines'}, not the {fmt} question format",
                  fmt)
    parse = {"alpaca_eval": alpaca_question, "arena_hard": arena_question, "mt_bench": mt_bench_question}[fmt]
    rows = list(enumerate(items)) if kind == "json" else items
    questions, seen = [], {}
    for where, obj in rows:
        loc = f"[{where}]" if kind == "json" else f":{where}"
        if not isinstance(obj, dict):
            raise bad(path, loc, f"expected a JSON object, got {type(obj).__name__}", fmt)
        problem, q = parse(obj, len(questions))
        if problem:
            raise bad(path, loc, problem, fmt)
        key = json.dumps(q["id"])
        if key in seen:
            raise bad(path, loc, f"question id {key} already used at {seen[key]}", fmt)
        seen[key] = loc
        questions.append(q)
    if not questions:
        raise bad(path, "", "holds no questions", fmt)
    return fmt, questions


def nonempty(s) -> bool:
    return isinstance(s, str) and bool(s.strip())


def alpaca_question(obj: dict, index: int) -> tuple[Optional[str], dict]:
    if not nonempty(obj.get("instruction")):
        return "missing or empty field 'instruction'", {}
    extra = {"dataset": obj["dataset"]} if "dataset" in obj else {}
    return None, {"id": index, "turns": [obj["instruction"]], "extra": extra}


def question_id(obj: dict) -> Optional[str]:
    qid = obj.get("question_id", obj.get("uid"))
    return qid if isinstance(qid, (int, str)) and not isinstance(qid, bool) else None


def arena_question(obj: dict, index: int) -> tuple[Optional[str], dict]:
    qid = question_id(obj)
    if qid is None:
        return "missing field 'question_id' (a string or an integer)", {}
    turns = obj.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and nonempty(turns[0].get("content")):
        text = turns[0]["content"]
    elif nonempty(obj.get("prompt")):
        text = obj["prompt"]
    else:
        return "expected 'turns': [{\"content\": \"...\"}] with a non-empty first turn", {}
    return None, {"id": qid, "turns": [text], "extra": {}}


def mt_bench_question(obj: dict, index: int) -> tuple[Optional[str], dict]:
    qid = question_id(obj)
    if qid is None:
        return "missing field 'question_id' (a string or an integer)", {}
    turns = obj.get("turns")
    if not (isinstance(turns, list) and turns and all(nonempty(t) for t in turns)):
        return "expected 'turns': a list of non-empty strings (MT-Bench has two)", {}
    return None, {"id": qid, "turns": list(turns), "extra": {}}


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Prompts of each turn, answers in the benchmark's format
# ---------------------------------------------------------------------------------------------


def turn_prompts(questions: list[dict], turn: int, earlier: list[dict]) -> list[dict]:
    """Prompt records {"id", "prompt"} of turn `turn` (0-based) for the questions that have it:
    turn 0 is the question alone, a later turn the conversation so far (the questions and this
    policy's own answers of `earlier`, {"prompt_id", "text"} per turn) then the new question."""
    answers = [{str(a["prompt_id"]): a["text"] for a in turn_answers} for turn_answers in earlier]
    out = []
    for q in questions:
        if turn >= len(q["turns"]):
            continue
        if turn == 0:
            out.append({"id": q["id"], "prompt": q["turns"][0]})
            continue
        messages = []
        for t in range(turn):
            messages += [{"role": "user", "content": q["turns"][t]},
                         {"role": "assistant", "content": answers[t][str(q["id"])]}]
        out.append({"id": q["id"], "prompt": messages + [{"role": "user", "content": q["turns"][turn]}]})
    return out


def answer_id(model: str, qid) -> str:
    """Deterministic per (model, question): a rerun writes the same file."""
    return hashlib.sha256(f"{model}:{json.dumps(qid)}".encode()).hexdigest()[:22]


def format_answers(fmt: str, model: str, questions: list[dict], turns: list[list[dict]],
                   tstamp: Optional[float] = None):
    """The answer file's content: a list (alpaca_eval, written as JSON) or lines (JSONL).
    `turns[t]` holds the sample records ({"prompt_id", "text", "num_tokens"}) of turn t."""
    by_turn = [{str(s["prompt_id"]): s for s in samples} for samples in turns]
    tstamp = time.time() if tstamp is None else tstamp
    out = []
    for q in questions:
        answers = [by_turn[t][str(q["id"])] for t in range(len(q["turns"])) if t < len(by_turn)]
        if fmt == "alpaca_eval":
            out.append({"instruction": q["turns"][0], "output": answers[0]["text"].strip(), "generator": model, **q["extra"]})
            continue
        if fmt == "arena_hard":
            choice_turns = [{"content": a["text"].strip()} for a in answers]
        else:
            choice_turns = [a["text"].strip() for a in answers]
        line = {"question_id": q["id"], "answer_id": answer_id(model, q["id"]), "model_id": model,
                "choices": [{"index": 0, "turns": choice_turns}], "tstamp": tstamp}
        if fmt == "arena_hard":
            line["conv_metadata"] = {"token_len": answers[0].get("num_tokens")}
        out.append(line)
    return out


def answer_path(out_dir: Path, fmt: str, model: str) -> Path:
    if fmt == "alpaca_eval":
        return out_dir / model / "model_outputs.json"
    return out_dir / "model_answer" / f"{model}.jsonl"


def write_answers(path: Path, fmt: str, content: list) -> None:
    from aipo_mp.runtime.files import atomic_write_text

    if fmt == "alpaca_eval":
        atomic_write_text(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    else:
        atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in content))


def read_answers(path: str | Path, fmt: str) -> dict:
    """{question key: [turn texts]} of an answer file in `fmt` (a baseline to judge against).
    alpaca_eval answers are keyed by instruction, the others by question_id."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"--baseline {path}: cannot be read ({e}); give an answer file in the {fmt} format") from None
    out = {}
    try:
        if fmt == "alpaca_eval":
            for k, row in enumerate(json.loads(text)):
                if not (isinstance(row, dict) and isinstance(row.get("instruction"), str)
                        and isinstance(row.get("output"), str)):
                    raise DataError(f"--baseline {path}[{k}]: expected {{\"instruction\", \"output\"}}; give an "
                                    "AlpacaEval model_outputs.json")
                out[row["instruction"]] = [row["output"]]
            return out
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                turns = row["choices"][0]["turns"]
                out[json.dumps(row["question_id"])] = [t["content"] if isinstance(t, dict) else str(t) for t in turns]
            except (KeyError, IndexError, TypeError):
                raise DataError(f"--baseline {path}:{n}: expected question_id and choices[0].turns; give a "
                                f"model_answer/<name>.jsonl of {fmt}") from None
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"--baseline {path}: not valid JSON ({e}); give an answer file in the {fmt} format") from None
    return out


def question_key(fmt: str, q: dict) -> str:
    return q["turns"][0] if fmt == "alpaca_eval" else json.dumps(q["id"])
