"""Experiment tracking in Weights & Biases (`output.wandb`), beside the metrics.jsonl and
TensorBoard files that are always written.

- The trainer (aipo_mp/training/metrics.py) logs every optimizer step's metrics from global rank
  0, the rank that writes metrics.jsonl (its values are the all-reduced global means), with
  W&B step = the training step. One W&B run per training output directory.
- `aipo-mp run` (aipo_mp/rounds/report.py) logs each round's report row once it exists, keys
  `round/<column>` with W&B step = the round, and the report's plots as images, into one W&B run
  of the driver; all runs of a run directory share its W&B group.

wandb is imported only when `output.wandb.project` is set and the mode is not "disabled". Online
runs get a stable id (a hash of the directory), so a resumed stage continues its W&B run.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

from aipo_mp.errors import ConfigError


def enabled(wandb_cfg) -> bool:
    return bool(wandb_cfg and wandb_cfg.project) and wandb_cfg.mode != "disabled"


def start_run(wandb_cfg, directory: str | Path, name: str, job_type: str, config: Optional[dict] = None):
    """A started wandb run writing under `directory`/wandb, or None when tracking is off."""
    if not enabled(wandb_cfg):
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("output.wandb.project is set but wandb is not installed; run `make setup` or "
                          "`pip install 'aipo-mp[wandb]'`, or remove output.wandb") from None
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if wandb_cfg.mode == "online":  # resume the same W&B run after a requeue
        kwargs = {"id": hashlib.sha256(f"{directory}:{job_type}".encode()).hexdigest()[:16], "resume": "allow"}
    return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode, dir=str(directory),
                      name=name, group=wandb_cfg.group, job_type=job_type, config=config,
                      settings=wandb.Settings(console="off", silent=True), **kwargs)


def numeric(record: dict, prefix: str = "", skip: tuple = ()) -> dict:
    """The finite int/float values of a record (W&B plots numbers), keys prefixed."""
    return {prefix + k: v for k, v in record.items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def offline_history(wandb_dir: str | Path) -> list[dict]:
    """The logged steps ({key: value}, `_step` included) of every offline run under `wandb_dir`
    (DIR/wandb), oldest run first, read from W&B's own `.wandb` record files: a check that an
    offline run holds what was logged, without network."""
    import json

    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    rows = []
    for path in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
