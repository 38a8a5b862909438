"""What defines a training run, recorded in its output directory (`run_identity.json`).

A run is defined by its data (a fingerprint of the normalized pairs and the settings that turn
them into tokens), its starting weights and tokenizer (a fingerprint of the model directory), its
reference, its objective and hyperparameters, and what fixes the data order (seed, global batch,
shuffle). The parallel layout, the step count and the save interval are not part of it: a run may
resume at another length or layout. Reusing a directory with a different definition is an error
that says how to start fresh or resume, instead of silently resuming the old checkpoint.

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
    from aipo_mp.data.prepare import effective_max_length

    d = cfg.data
    return {
        "data": records_fingerprint(records),
        "data_settings": {"max_length": effective_max_length(cfg), "max_prompt_length": d.max_prompt_length,
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


def check_identity(out_dir: str | Path, identity: dict) -> bool:
    """Raise RunIdentityError when out_dir records another run. True when it records none yet
    (the caller then records this one with `record_identity`). Reads only: safe on every rank."""
    path = Path(out_dir) / IDENTITY_FILE
    if not path.exists():
        return True
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise RunIdentityError(f"{path} is damaged; delete it only if {out_dir} is the run you mean to resume, or "
                               "choose a new output.dir") from None
    diffs = differences(recorded, identity)
    if diffs:
        raise RunIdentityError(
            f"output.dir={out_dir} holds a run with different {', '.join(diffs)}; to start fresh choose a new "
            f"output.dir (or delete {out_dir}), to resume rerun with the settings in {path.parent / 'config.yaml'}")
    return False


def record_identity(out_dir: str | Path, identity: dict) -> None:
    from aipo_mp.runtime.files import atomic_write_json

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out_dir) / IDENTITY_FILE, identity)

