"""What defines a training run, recorded in its output directory (`run_identity.json`).

A run is defined by its data (a fingerprint of the normalized pairs and the settings that turn
them into tokens), its starting weights and tokenizer (a fingerprint of the model directory), its
reference, its objective and hyperparameters, and what fixes the data order (seed, global batch,
shuffle). The parallel layout, the step count and the save interval are not part of it: a run may
resume at another length or layout. Reusing a directory with a different definition is an error
that says how to start fresh or resume, instead of silently resuming the old checkpoint.

A directory from an older version holds checkpoints but no `run_identity.json`: it is resumed
only when its recorded config names the same data file and starting weights and the data file
has not changed since its first checkpoint was written; otherwise it is refused, unless
`output.resume_unrecorded=true` says to resume it anyway.

Derived artifacts are keyed too: the reference log-prob table stores the key of what it was
computed from (`reference_key`) and is recomputed when that key differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from aipo_mp.errors import ConfigError

IDENTITY_FILE = "run_identity.json"
SMALL_FILE_BYTES = 1 << 20  # hashed whole; larger files: size and their first 64 KiB (headers)
HEAD_BYTES = 1 << 16


class RunIdentityError(ConfigError):
    """The output directory holds a different run."""


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def records_fingerprint(records: list[dict]) -> str:
    """The pairs as the trainer sees them (after schema normalization): the same pairs in JSONL,
    Parquet or TRL's format have the same fingerprint."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["prompt"], r["chosen"], r["rejected"]], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def tree_fingerprint(path: Optional[str]) -> Optional[str]:
    """Cheap content fingerprint of a model directory: every file's relative path and size, small
    files (configs, tokenizer, checkpoint metadata) hashed whole and large ones by their first
    64 KiB (safetensors headers hold every tensor's offsets). Reading 100B weights is not needed
    to notice another checkpoint."""
    if not path:
        return None
    root = Path(path)
    if not root.exists():
        return f"missing:{root}"
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
        with open(f, "rb") as handle:
            h.update(handle.read(SMALL_FILE_BYTES if size <= SMALL_FILE_BYTES else HEAD_BYTES))
    return h.hexdigest()[:16]


def run_identity(cfg, records: list[dict], objective_params: dict) -> dict:
    d = cfg.data
    # data.prepare.effective_max_length, written out: data.prepare imports this module.
    max_length = d.max_length or cfg.train.seq_length // 2
    return {
        "data": records_fingerprint(records),
        "data_settings": {"max_length": max_length, "max_prompt_length": d.max_prompt_length,
                          "shuffle": d.shuffle},
        "model": tree_fingerprint(cfg.model.path),
        "reference": {"mode": cfg.reference.mode, "weights": tree_fingerprint(cfg.reference.path)},
        "objective": {"name": cfg.objective.name, **objective_params},
        "seed": cfg.train.seed,
        "global_batch_pairs": cfg.train.global_batch_pairs,
        "dtype": cfg.precision.dtype,
    }


def reference_key(identity: dict) -> str:
    """What the reference log-prob table depends on."""
    weights = identity["reference"]["weights"] if identity["reference"]["mode"] == "model" else identity["model"]
    return digest([identity["data"], identity["data_settings"], weights, identity["dtype"]])


WHAT = {"data": "data (data.train)", "data_settings": "data settings (data.max_length, data.max_prompt_length, "
        "data.shuffle)", "model": "starting weights (model.path)", "reference": "reference", "objective": "objective",
        "seed": "seed (train.seed)", "global_batch_pairs": "batch (train.global_batch_pairs)",
        "dtype": "precision.dtype"}


def differences(recorded: dict, current: dict) -> list[str]:
    return [WHAT.get(k, k) for k in current if recorded.get(k) != current[k]]


def check_identity(out_dir: str | Path, identity: dict, cfg=None) -> bool:
    """Raise RunIdentityError when out_dir records another run. True when it records none yet
    (the caller then records this one with `record_identity`). Reads only: safe on every rank.
    With `cfg`, a directory that holds checkpoints but no identity (an older version's run) must
    show it trained on this data (see `check_unrecorded`)."""
    from aipo_mp.runtime.json_files import read_json_object

    path = Path(out_dir) / IDENTITY_FILE
    if not path.exists():
        if cfg is not None and checkpoint_steps(Path(out_dir)):
            check_unrecorded(Path(out_dir), cfg)
        return True
    recorded = read_json_object(path, "the run identity", fix=f"delete it only if {out_dir} is the run you mean to "
                                "resume, or choose a new output.dir", error=RunIdentityError)
    diffs = differences(recorded, identity)
    if diffs:
        raise RunIdentityError(
            f"output.dir={out_dir} holds a run with different {', '.join(diffs)}; to start fresh choose a new "
            f"output.dir (or delete {out_dir}), to resume rerun with the settings in {path.parent / 'config.yaml'}")
    return False


def checkpoint_steps(out_dir: Path) -> list[Path]:
    """The step directories under out_dir/checkpoints, oldest first (any state: a damaged one
    still shows the directory holds a run)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    steps = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit()]
    return sorted(steps, key=lambda d: int(d.name[5:]))


def newest_mtime(path: Path) -> float:
    """When a data file (or any file of a data directory) last changed."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


def recorded_config(out_dir: Path, steps: list[Path]) -> Optional[dict]:
    """The config the old run recorded (its output config.yaml, else its first checkpoint's)."""
    import yaml

    for path in (out_dir / "config.yaml", *(d / "config.yaml" for d in steps)):
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            return data
    return None


def same_path(a, b) -> bool:
    return bool(a) and bool(b) and Path(str(a)).resolve() == Path(str(b)).resolve()


def unrecorded_mismatch(out_dir: Path, cfg) -> Optional[str]:
    """Why the checkpoints of an identity-less run directory cannot be shown to come from this
    data and these starting weights, or None when they can."""
    steps = checkpoint_steps(out_dir)
    old = recorded_config(out_dir, steps)
    if old is None:
        return "it recorded no readable config.yaml"
    section = lambda name: old.get(name) if isinstance(old.get(name), dict) else {}  # noqa: E731
    old_data, old_model = section("data").get("train"), section("model").get("path")
    if not same_path(old_data, cfg.data.train):
        return f"its checkpoints were trained on data.train={old_data}"
    if not same_path(old_model, cfg.model.path):
        return f"its checkpoints started from model.path={old_model}"
    first = steps[0]
    stamp = next((f for f in (first / "train_state.json", first) if f.exists()), first)
    if newest_mtime(Path(cfg.data.train)) > stamp.stat().st_mtime:
        return f"data.train={cfg.data.train} changed after its first checkpoint ({first.name}) was written"
    return None


def check_unrecorded(out_dir: Path, cfg) -> None:
    """An older run directory (checkpoints, no identity): refuse to resume it on other data."""
    if getattr(cfg.output, "resume_unrecorded", False):
        return
    why = unrecorded_mismatch(out_dir, cfg)
    if why is None:
        return
    raise RunIdentityError(
        f"output.dir={out_dir} holds checkpoints of a run that recorded no {IDENTITY_FILE} (an older version), and "
        f"{why}; to start fresh choose a new output.dir (or delete {out_dir}), to resume those checkpoints anyway "
        "set output.resume_unrecorded=true")


def record_identity(out_dir: str | Path, identity: dict) -> None:
    from aipo_mp.runtime.files import atomic_write_json

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out_dir) / IDENTITY_FILE, identity)

