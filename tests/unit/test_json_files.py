"""The one reader of trusted JSON (aipo_mp/runtime/json_files.py): each way a file can be damaged
is one line naming the file, the problem and the fix; a good file comes back as parsed."""

from __future__ import annotations

import pytest

from aipo_mp.errors import CheckpointError, ConfigError
from aipo_mp.runtime.json_files import read_json_list, read_json_object

FIX = "copy it again"

CASES = [  # (file bytes, required keys, fragment of the line)
    (b"[1, 2]", (), "holds a list, not a JSON object"),
    (b"null", (), "holds null, not a JSON object"),
    (b'"text"', (), "holds a string, not a JSON object"),
    (b'{"a": {"b": [1, 2', (), "is cut short (truncated JSON)"),
    (b'{"a": "cut in the mid', (), "is cut short (truncated JSON)"),
    (b"", (), "is empty"),
    (b'{"a": 1} trailing', (), "is not valid JSON (Extra data: line 1 column 10)"),
    (b"\xff\xfe\x00binary", (), "is not text"),
    (b'{"a": 1}', ("b",), "lacks the key 'b'"),
    (b'{"a": "1"}', {"a": int}, "has 'a' = a string, expected an integer"),
    (b'{"a": true}', {"a": int}, "has 'a' = true/false, expected an integer"),
    (b'{"a": null}', {"a": dict}, "has 'a' = null, expected an object"),
]


@pytest.mark.parametrize("raw,required,fragment", CASES, ids=[c[2] for c in CASES])
def test_damaged_file_is_one_line_naming_file_problem_and_fix(tmp_path, raw, required, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError) as e:
        read_json_object(path, "config.json", required, FIX)
    assert e.value.errors == [e.value.errors[0]] and "\n" not in e.value.errors[0]
    line = e.value.errors[0]
    assert line.startswith(f"{path}: config.json ") and fragment in line and line.endswith(f"; {FIX}"), line


def test_good_files_come_back_parsed_and_the_error_type_is_the_callers(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"a": 1, "b": 2.5, "c": {"d": []}}')
    assert read_json_object(path, "state", {"a": int, "b": float, "c": dict}) == {"a": 1, "b": 2.5, "c": {"d": []}}
    assert read_json_object(path, "state", {"a": float})["a"] == 1  # an int is a number
    with pytest.raises(ConfigError, match="not found; restore or re-create the file"):
        read_json_object(tmp_path / "missing.json", "state", error=ConfigError)
    todo = tmp_path / "todo.json"
    todo.write_text("[0, 2, 3]")
    assert read_json_list(todo, "the shard plan", int) == [0, 2, 3]
    todo.write_text('[0, "2"]')
    with pytest.raises(CheckpointError, match="holds a string where an integer belongs"):
        read_json_list(todo, "the shard plan", int)
