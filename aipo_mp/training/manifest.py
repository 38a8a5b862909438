"""`manifest.json` of a Megatron checkpoint directory: every file with its size and a content
checksum (zlib's CRC-32), so loading can tell a damaged file, or one copied in from another
checkpoint at the same size, from the file that was written.

Who hashes what: a torch_dist file `__R_K.distcp` was written by global rank R, and an RNG file
`rng/rank_R_of_W.pt` too; rank R (modulo the current world size) hashes it, while its bytes are
still in that node's page cache after the save; every other file (metadata, JSON, tokenizer
files) is rank 0's. Saving therefore reads back what it wrote once, spread over the ranks that
wrote it (megatron's writer offers no hook to hash the bytes as they are written); loading checks
the same way before anything is loaded. Both are collective when torch.distributed is up.

A manifest written before checksums existed ({"files": {name: size}} only) still loads: sizes
are checked, contents are not.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"
CHECKSUM = "crc32"  # the manifest key: {relative name: 8 hex digits}
CHUNK_BYTES = 8 << 20
WRITER_RANK = re.compile(r"^__(\d+)_\d+\.distcp$")
RNG_RANK = re.compile(r"^rank_(\d+)_of_\d+\.pt$")


def file_crc32(path: Path) -> str:
    """CRC-32 of the file's bytes, read in 8 MiB pieces (memory stays flat for any file size)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def owner_rank(name: str, world: int) -> int:
    """The rank that hashes (on save) and checks (on load) file `name`: its writer, else rank 0."""
    base = name.rsplit("/", 1)[-1]
    m = WRITER_RANK.match(base) or RNG_RANK.match(base)
    return int(m.group(1)) % world if m else 0


def _rank_world() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """Every rank's `obj` (all_gather_object on the default group; [obj] without one)."""
    import torch

    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def listed_files(directory: Path) -> list[str]:
    """Relative names of the checkpoint's files, the manifest itself and temporary files excluded."""
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*")
                  if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp"))


def collect(directory: Path, names: Optional[list[str]] = None) -> dict[str, tuple[int, str]]:
    """{name: (size, crc32)} of `names` (default: every file), each hashed by its owner rank.
    Collective; every rank gets the whole dict."""
    rank, world = _rank_world()
    names = listed_files(directory) if names is None else names
    mine = {n: (directory.joinpath(n).stat().st_size, file_crc32(directory / n))
            for n in names if owner_rank(n, world) == rank}
    merged: dict[str, tuple[int, str]] = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def write(directory: Path, entries: dict[str, tuple[int, str]]) -> None:
    """(rank 0) manifest.json: {"files": {name: size}, "crc32": {name: hex}}; `files` keeps the
    layout older readers know."""
    from aipo_mp.runtime.files import atomic_write_json

    names = sorted(entries)
    atomic_write_json(directory / MANIFEST, {"files": {n: entries[n][0] for n in names},
                                             CHECKSUM: {n: entries[n][1] for n in names}})


def read(directory: Path) -> Optional[dict[str, tuple[int, Optional[str]]]]:
    """{name: (size, crc32 or None for a manifest older than checksums)}, None without a manifest.
    A damaged manifest raises CheckpointError naming it."""
    from aipo_mp.errors import CheckpointError
    from aipo_mp.runtime.json_files import read_json_object

    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    fix = "the checkpoint's save did not finish or the file was damaged; use another checkpoint"
    data = read_json_object(path, "checkpoint manifest", {"files": dict}, fix=fix)
    sums = data.get(CHECKSUM) or {}
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path}: checkpoint manifest has {CHECKSUM!r} that is not an object; {fix}")
    out = {}
    for name, size in data["files"].items():
        if isinstance(size, bool) or not isinstance(size, int) or not isinstance(sums.get(name, ""), str):
            raise CheckpointError(f"{path}: checkpoint manifest entry {name!r} is damaged; {fix}")
        out[name] = (size, sums.get(name))
    return out


def file_problem(directory: Path, name: str, size: int, crc: Optional[str]) -> Optional[str]:
    f = directory / name
    if not f.is_file():
        return f"{f} is missing: the checkpoint is incomplete or damaged"
    have = f.stat().st_size
    if have != size:
        return f"{f} has {have} bytes where {size} were written: the checkpoint is incomplete or damaged"
    if crc is not None:
        got = file_crc32(f)
        if got != crc:
            return (f"{f}: content checksum {got} differs from {crc} recorded when it was written (damaged, or "
                    "copied in from another checkpoint)")
    return None


def check(directory: str | Path, under: str = "") -> Optional[str]:
    """The first problem (sorted by file name) with the files the manifest lists under `under`
    (a sub-directory such as "model/"; "" = all), or None. Each rank checks the files it owns;
    collective, and every rank returns the same answer. No manifest: None (nothing to check)."""
    directory = Path(directory)
    rank, world = _rank_world()
    problem = None
    try:
        entries = read(directory)
    except Exception as e:  # noqa: BLE001 - agreed on below, so no rank waits alone
        entries, problem = None, str(e)
    found = []
    if entries is not None and problem is None:
        for name in sorted(entries):
            if name.startswith(under) and owner_rank(name, world) == rank:
                p = file_problem(directory, name, *entries[name])
                if p:
                    found.append((name, p))
                    break  # one named file is enough; the others are checked by their owners
    elif problem is not None and rank == 0:
        found.append(("", problem))
    everything = sorted(x for part in _gather(found) for x in part)
    return everything[0][1] if everything else None
