"""The one reader for every JSON file the tools trust (an HF config.json, aipo_checkpoint.json, a
safetensors index, manifests, run and train state, shard markers).

A damaged file must end in one line naming the file, what is wrong with it (not JSON, cut short,
a list or null where an object belongs, a missing key, a value of the wrong type) and the fix, never
in an AttributeError or KeyError deep inside the caller. Imports nothing heavy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Type

from aipo_mp.errors import CheckpointError, UserError

DEFAULT_FIX = "restore or re-create the file"

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false", type(None): "null"}


def json_type_name(value: Any) -> str:
    """How JSON calls a parsed value: 'a list', 'null', 'a string' ..."""
    if isinstance(value, bool):
        return "true/false"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _wanted_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def _type_fits(value: Any, kind: type | tuple) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is not a count
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def parse_json_text(text: str | bytes, path: Path, what: str, fix: str, error: Type[UserError]) -> Any:
    """json.loads with one line for text that is not JSON or stops part-way (a cut file)."""
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not text (binary or damaged bytes); {fix}") from None
    except json.JSONDecodeError as e:
        body = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        # A file cut short ends inside a value: the parser runs out of text, or an open string.
        cut = e.pos >= len(body.rstrip()) or e.msg.startswith("Unterminated string")
        problem = "is empty" if not body.strip() else ("is cut short (truncated JSON)" if cut else
                                                          f"is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})")
        raise error(f"{path}: {what} {problem}; {fix}") from None


def read_json(path: str | Path, what: str, fix: str = DEFAULT_FIX,
              error: Type[UserError] = CheckpointError) -> Any:
    """Any JSON value from a file, with one line for a missing, unreadable or damaged file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found; {fix}") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} is a directory, not a file; {fix}") from None
    except PermissionError:
        raise error(f"{path}: {what} cannot be read (permission denied); fix its permissions") from None
    return parse_json_text(raw, path, what, fix, error)


def check_object(value: Any, path: str | Path, what: str,
                 required: Mapping[str, type | tuple] | Iterable[str] = (), fix: str = DEFAULT_FIX,
                 error: Type[UserError] = CheckpointError) -> dict:
    """`value` as a dict holding every required key (with the given JSON type), or one line."""
    if not isinstance(value, dict):
        raise error(f"{path}: {what} holds {json_type_name(value)}, not a JSON object; {fix}")
    kinds = required if isinstance(required, Mapping) else {k: None for k in required}
    for key, kind in kinds.items():
        if key not in value:
            raise error(f"{path}: {what} lacks the key {key!r}; {fix}")
        if kind is not None and not _type_fits(value[key], kind):
            raise error(f"{path}: {what} has {key!r} = {json_type_name(value[key])}, expected "
                        f"{_wanted_name(kind)}; {fix}")
    return value


def read_json_object(path: str | Path, what: str,
                     required: Mapping[str, type | tuple] | Iterable[str] = (), fix: str = DEFAULT_FIX,
                     error: Type[UserError] = CheckpointError) -> dict:
    """A JSON file that must hold an object: returns the dict, or raises `error` (a UserError,
    CheckpointError by default) with one line naming the file, the problem and `fix`.

    `required` names keys that must be present: a tuple of names, or {name: type} to check the
    value's JSON type too (float accepts an int; bool never counts as an int)."""
    return check_object(read_json(path, what, fix, error), path, what, required, fix, error)


def read_json_list(path: str | Path, what: str, item: type | tuple | None = None, fix: str = DEFAULT_FIX,
                   error: Type[UserError] = CheckpointError) -> list:
    """A JSON file that must hold a list (optionally of one item type), or one line."""
    value = read_json(path, what, fix, error)
    if not isinstance(value, list):
        raise error(f"{path}: {what} holds {json_type_name(value)}, not a JSON list; {fix}")
    if item is not None:
        for v in value:
            if not _type_fits(v, item):
                raise error(f"{path}: {what} holds {json_type_name(v)} where {_wanted_name(item)} belongs; {fix}")
    return value
