"""Which checkpoint a rerun resumes from: the newest complete one.

A checkpoint is complete when its `manifest.json` (written by rank 0 after every rank finished
writing, just before `latest` moves) lists train_state.json and files that are all present with
their recorded sizes, and megatron's distributed-checkpoint metadata is there. Checkpoints
written before manifests existed are accepted when `latest` names them and their metadata files
are present. A damaged or incomplete newest checkpoint gives a warning line and the previous one
is used, so progress is never lost to one bad save and metrics are trimmed only to the step
actually resumed from. Contents are checked (checksums, then loading) by
run_checkpoints.resume_from_checkpoint, which falls back the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from aipo_mp.errors import CHECKPOINT_META, TRAIN_STATE
from aipo_mp.training.manifest import MANIFEST

STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED = (TRAIN_STATE, CHECKPOINT_META, "model/.metadata")


def step_dirs(root: Path) -> list[Path]:
    """step_NNNNNNN directories, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def problem_with(step_dir: Path, legacy_ok: bool) -> Optional[str]:
    """Why `step_dir` cannot be resumed from (judged by names and sizes), or None."""
    from aipo_mp.training import manifest

    try:
        files = manifest.read(step_dir)
    except Exception:  # noqa: BLE001 - any damage makes the checkpoint unusable, with this reason
        return f"{MANIFEST} is damaged"
    if files is not None:
        if TRAIN_STATE not in files:  # the model's manifest only: the step's own files came later
            return f"{MANIFEST} does not list {TRAIN_STATE} (the save did not finish)"
        for name, (size, _) in files.items():
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
        step = json.loads((step_dir / TRAIN_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "train_state.json is damaged"
    if isinstance(step, bool) or not isinstance(step, int):
        return "train_state.json is damaged"
    return None


def candidates(root: Path, latest_name: Optional[str]) -> tuple[list[Path], list[str]]:
    """Complete checkpoints newest first, and a warning line for each newer one passed over
    (naming the one used instead, or saying that the run starts from step 0)."""
    good, passed = [], []
    for d in step_dirs(root):
        problem = problem_with(d, legacy_ok=d.name == latest_name)
        if problem is None:
            good.append(d)
        elif good == []:
            passed.append((d, problem))
    then = f"falling back to {good[0].name}" if good else "no complete checkpoint is left: starting from step 0"
    warnings = [f"warning: checkpoint {d} is not usable ({problem}); {then}" for d, problem in passed]
    if latest_name and not (root / latest_name).is_dir():
        warnings.insert(0, f"warning: {root / 'latest'} names {latest_name}, which does not exist; using the newest "
                        "complete checkpoint instead")
    return good, warnings
