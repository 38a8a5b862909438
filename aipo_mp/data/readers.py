"""Rows of a local dataset in the formats users have: JSONL, gzip-compressed JSONL, Parquet (a file
or a directory of files), and a directory written by `datasets.Dataset.save_to_disk`.

The format is recognized by content where it can be (Parquet starts with b"PAR1", gzip with
1f 8b), so a misnamed file is still read correctly. Every row comes with its location
("FILE:3" for line 3, "FILE row 3") for error messages and its 0-based index (the line index in
JSONL, blank lines included; the row index in tables). A JSONL line that is not a JSON object is handed on as a
`BadRow` so the caller decides (error or skip) and counts it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataFormatError(ValueError):
    """The file or directory cannot be read as any supported format (one line, with the fix)."""


@dataclass
class BadRow:
    problem: str  # what is wrong with the raw line (not JSON, not UTF-8)


def detect_format(path: Path) -> str:
    """'jsonl', 'jsonl.gz', 'parquet', 'parquet-dir' or 'save_to_disk'."""
    if path.is_dir():
        if any((path / m).exists() for m in SAVE_TO_DISK_MARKERS):
            return "save_to_disk"
        if any(path.glob("*.parquet")):
            return "parquet-dir"
        raise DataFormatError(f"{path} is a directory without Parquet files or a datasets.save_to_disk layout "
                              "(dataset_info.json, state.json); point at a JSONL/Parquet file or such a directory")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == PARQUET_MAGIC:
        return "parquet"
    if head[:2] == GZIP_MAGIC:
        return "jsonl.gz"
    return "jsonl"


def read_rows(path: str | Path, what: str = "data.train") -> tuple[str, Iterator[tuple[str, int, object]]]:
    """(format name, iterator of (location, index, row)); a row is a dict or a BadRow."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{what}: file not found: {path}; check the path (relative paths start at the "
                              "working directory)")
    fmt = detect_format(path)
    readers = {"jsonl": jsonl_rows, "jsonl.gz": jsonl_rows, "parquet": parquet_rows,
               "parquet-dir": parquet_dir_rows, "save_to_disk": save_to_disk_rows}
    return fmt, readers[fmt](path)


def jsonl_rows(path: Path) -> Iterator[tuple[str, int, object]]:
    opener = gzip.open if detect_format(path) == "jsonl.gz" else open
    try:
        with opener(path, "rb") as f:  # bytes, so bad UTF-8 is reported with its line number
            for line_number, raw in enumerate(f, start=1):
                if raw.strip():
                    yield f"{path}:{line_number}", line_number - 1, parse_json_line(raw)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise DataFormatError(f"{path}: cannot be read as gzip-compressed JSONL ({e}); re-create the file") from None


def parse_json_line(raw: bytes) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(f"not valid UTF-8 (byte {e.start})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow(f"not valid JSON ({e.msg} at column {e.colno})")


def parquet_rows(path: Path, batch_rows: int = 1024) -> Iterator[tuple[str, int, object]]:
    pq = import_pyarrow_parquet(path)
    try:
        reader = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises ArrowInvalid for a damaged footer
        raise DataFormatError(f"{path}: not a readable Parquet file ({first_line(e)}); re-create the file") from None
    row = 0
    for batch in reader.iter_batches(batch_size=batch_rows):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", row - 1, record


def parquet_dir_rows(path: Path) -> Iterator[tuple[str, int, object]]:
    """The files in name order, as one table (rows numbered across files)."""
    count = 0
    for file in sorted(path.glob("*.parquet")):
        for where, _, record in parquet_rows(file):
            yield where, count, record
            count += 1


def save_to_disk_rows(path: Path) -> Iterator[tuple[str, int, object]]:
    try:
        import datasets
    except ImportError:
        raise DataFormatError(f"{path} was written by datasets.save_to_disk; install the `datasets` package to "
                              "read it (pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataFormatError(f"{path}: datasets.load_from_disk failed ({first_line(e)}); re-save the dataset") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataFormatError(f"{path} holds splits {', '.join(loaded)} but no 'train' split; point at one "
                                  f"split's directory (e.g. {path}/{next(iter(loaded))})")
        loaded = loaded["train"]
    for row, record in enumerate(loaded, start=1):
        yield f"{path} row {row}", row - 1, record


def import_pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError(f"{path} is a Parquet file; install pyarrow to read it (pip install pyarrow)") from None
    return pq


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
