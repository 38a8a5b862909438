"""Which checkpoint a rerun resumes from: the newest complete one.

A checkpoint is complete when its `manifest.json` (written by rank 0 after every rank finished
writing, just before `latest` moves) lists files that are all present with their recorded sizes,
and megatron's distributed-checkpoint metadata is there. Checkpoints written before manifests
existed are accepted when `latest` names them and their metadata files are present. A damaged or
incomplete newest checkpoint gives a warning line and the previous one is used, so progress is
never lost to one bad save and metrics are trimmed only to the step actually resumed from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from aipo_mp.errors import CHECKPOINT_META, TRAIN_STATE

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED = (TRAIN_STATE, CHECKPOINT_META, "model/.metadata")


def step_dirs(root: Path) -> list[Path]:
    """step_NNNNNNN directories, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def write_manifest(step_dir: Path) -> None:
    """Every file of the checkpoint with its size (rank 0, after all ranks wrote theirs)."""
    from aipo_mp.runtime.files import atomic_write_json

    files = {str(f.relative_to(step_dir)): f.stat().st_size for f in sorted(step_dir.rglob("*"))
             if f.is_file() and f.name != MANIFEST}
    atomic_write_json(step_dir / MANIFEST, {"files": files})


def problem_with(step_dir: Path, legacy_ok: bool) -> Optional[str]:
    """Why `step_dir` cannot be resumed from, or None."""
    manifest = step_dir / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return f"{MANIFEST} is damaged"
        for name, size in files.items():
            f = step_dir / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
    elif not legacy_ok:
        return f"no {MANIFEST} (the save did not finish)"
    missing = [n for n in REQUIRED if not (step_dir / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if list(step_dir.rglob("*.tmp")):
        return "holds unfinished *.tmp files"
    try:
        json.loads((step_dir / TRAIN_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "train_state.json is damaged"
    return None


def candidates(root: Path, latest_name: Optional[str]) -> tuple[list[Path], list[str]]:
    """Complete checkpoints newest first, and a warning line for each newer one passed over."""
    good, warnings = [], []
    for d in step_dirs(root):
        problem = problem_with(d, legacy_ok=d.name == latest_name)
        if problem is None:
            good.append(d)
        elif good == []:
            warnings.append(f"warning: checkpoint {d} is not usable ({problem}); falling back to an older one")
    if latest_name and not (root / latest_name).is_dir():
        warnings.insert(0, f"warning: {root / 'latest'} names {latest_name}, which does not exist; using the newest "
                        "complete checkpoint instead")
    return good, warnings
