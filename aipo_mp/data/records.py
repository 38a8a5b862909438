"""Prompt, sample and answer records: JSONL reading and writing, prompt files in every format the
pairs reader accepts (aipo_mp.data.readers), and the checks that make a bad line one error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from aipo_mp.errors import DataError
from aipo_mp.runtime.files import atomic_write_text

PROMPT_HINT = 'each line needs a JSON object {"id"?: str|int, "prompt": str or [{"role": str, "content": str}, ...]}'


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records {"id", "prompt", ["meta"]} from a local dataset in any format the pairs
    reader accepts (JSONL, .jsonl.gz, Parquet, datasets.save_to_disk; aipo_mp.data.readers). A
    record without an id gets its 0-based line (row) index; other keys are kept under "meta" (a
    rule reward can read them, e.g. a reference answer)."""
    from aipo_mp.data.readers import BadRow, DataFormatError, read_rows

    path = Path(path)
    records, seen = [], {}
    try:
        fmt, rows = read_rows(path, what="prompts file")
        unit = "line" if fmt.startswith("jsonl") else "row"
        for where, index, obj in rows:
            problem = obj.problem if isinstance(obj, BadRow) else prompt_record_problem(obj)
            if problem:
                raise DataError(f"{where}: {problem}; {PROMPT_HINT}")
            record = prompt_record(obj, index)
            key = json.dumps(record["id"])
            if key in seen:
                raise DataError(f"{where}: prompt id {key} already used on {seen[key]}; give every prompt "
                                  "a unique id (or none: a missing id becomes the line index)")
            seen[key] = f"{unit} {index + 1}"
            records.append(record)
    except DataFormatError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    if not records:
        raise DataError(f"prompts file {path} contains no prompts; {PROMPT_HINT}")
    return records


def prompt_record_problem(obj: Any) -> Optional[str]:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
        return f"field 'id' must be a string or an integer, got {json.dumps(obj['id'])}"
    if "prompt" not in obj:
        return "missing field 'prompt'"
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        return None if prompt else "field 'prompt' is an empty string"
    if isinstance(prompt, list):
        if not prompt:
            return "field 'prompt' is an empty message list"
        for k, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                return f"message {k} of field 'prompt' is not a {{role: str, content: str}} object"
        return None
    return f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"


def prompt_record(obj: dict, default_id: int) -> dict:
    """{"id", "prompt", ["meta"]}: keys other than id and prompt go under meta."""
    record = {"id": obj.get("id", default_id), "prompt": obj["prompt"]}
    nested = isinstance(obj.get("meta"), dict)  # an already normalized record
    meta = {**(obj["meta"] if nested else {}),
            **{k: v for k, v in obj.items() if k not in ("id", "prompt") and not (k == "meta" and nested)}}
    if meta:
        record["meta"] = meta
    return record


def normalize_prompts(prompts) -> list[dict]:
    """Accept a path, or prompt dicts as read_prompts returns them (a missing id becomes the
    index; other keys go under meta; ids must be unique)."""
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    out, seen = [], set()
    for index, obj in enumerate(prompts):
        problem = prompt_record_problem(obj)
        if problem:
            raise DataError(f"prompt {index}: {problem}")
        record = prompt_record(obj, index)
        key = json.dumps(record["id"])
        if key in seen:
            raise DataError(f"prompt {index}: id {key} is used twice; prompt ids must be unique")
        seen.add(key)
        out.append(record)
    if not out:
        raise DataError("no prompts to sample from")
    return out


def load_records(source, fields: Sequence[str], what: str, fix: str) -> list[dict]:
    """Records from a JSONL path (or an already loaded list), each a dict holding `fields`."""
    records = read_jsonl(source) if isinstance(source, (str, Path)) else list(source)
    for k, record in enumerate(records):
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise DataError(f"{what} {k} lacks field(s) {', '.join(missing)}; {fix}")
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    records = []
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
