"""What a step reports: global means of the objective's metrics, tokens per second, the
metrics.jsonl / TensorBoard / Weights & Biases (output.wandb) log, step and save timing against the job's end, the progress bar."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from aipo_mp import objectives
from aipo_mp.config import Config
from aipo_mp.errors import RUN_STATE
from aipo_mp.runtime import platform, tracking
from aipo_mp.runtime.files import atomic_write_text
from aipo_mp.training.state import RunState, world_sum


def accumulate(sums: dict, losses: torch.Tensor, metrics: dict) -> None:
    sums["loss"] = sums.get("loss", 0.0) + losses.detach().float().sum()
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + v.detach().float().sum()


def metric_names(state: RunState) -> list[str]:
    """The objective's metric names, known on every rank (the all-reduce needs the same vector
    everywhere, also on pipeline stages that compute no loss)."""
    if "metric_names" not in state.stats:
        one = torch.zeros(1)
        probe = objectives.PairLogps(one, one, one, one, one + 1, one + 1)
        state.stats["metric_names"] = sorted(objectives.compute(state.cfg.objective.name, probe, state.objective_params)[1])
    return state.stats["metric_names"]


def summarize_step(state: RunState, step: int, sums: dict, rows, grad_norm: float, lr: float, elapsed: float) -> dict:
    """Global means over the batch: sums from one rank per data-parallel replica, all-reduced."""
    lay, cfg = state.layout, state.cfg
    keys = ["loss", *metric_names(state)]
    dev = platform.device()
    # One vector, one all-reduce, one device -> host read per step (the sums stay on the device
    # until here): metric sums, then real and computed tokens.
    parts = [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=dev) for k in keys]
    parts += [torch.tensor(float(sum(r.num_real_tokens for r in rows)), dtype=torch.float64, device=dev),
              torch.tensor(float(sum(r.tokens.numel() for r in rows)), dtype=torch.float64, device=dev)]
    vec = torch.stack(parts)
    if not lay.reports:
        vec.zero_()
    values = world_sum(vec).tolist()
    vec, tokens = values[:len(keys)], values[len(keys):]
    pairs = cfg.train.global_batch_pairs
    record = {"step": step + 1, "loss": float(vec[keys.index("loss")]) / pairs, "lr": lr, "grad_norm": grad_norm}
    record.update({k: float(vec[i]) / pairs for i, k in enumerate(keys) if k != "loss"})
    record["tokens_per_s"] = float(tokens[0]) / max(elapsed, 1e-9)
    record["token_utilization"] = float(tokens[0] / max(tokens[1], 1))
    record["step_time_s"] = elapsed
    return record


class MetricsLog:
    """metrics.jsonl, trimmed on resume to the steps the checkpoint covers, TensorBoard event
    files, and a W&B run when output.wandb is set (aipo_mp/runtime/tracking.py). Only global rank
    0 writes (`enabled`): summarize_step all-reduces the metrics, so rank 0 holds the global
    values even when the loss lives on the last pipeline stage."""

    def __init__(self, cfg: Config, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(cfg.output.dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    break  # a torn last line from a kill
        atomic_write_text(self.path, "".join(l + "\n" for l in kept))
        if cfg.output.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.output.dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None
        self.wandb = start_wandb(cfg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(tracking.numeric(record, "train/", skip=("step",)), step=record["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def start_wandb(cfg: Config):
    """The trainer's W&B run (None unless output.wandb.project is set): named after the output
    directory (e.g. round_0-train inside a run), its config the resolved training config."""
    out = Path(cfg.output.dir).absolute()
    wandb_cfg = cfg.output.wandb
    if wandb_cfg.group is None and (out.parent.parent / RUN_STATE).is_file():  # a round of `aipo-mp run`
        wandb_cfg = dataclasses.replace(wandb_cfg, group=out.parent.parent.name)
    return tracking.start_run(wandb_cfg, out, "-".join(out.parts[-2:]), "train", cfg.to_dict())


class StepClock:
    """Durations of the last step and save, checked against the Slurm job's end (aipo_mp/timeleft.py)."""

    def __init__(self):
        from aipo_mp.runtime.timeleft import TimeGuard

        self.guard = TimeGuard()
        self.seconds = {"step": 0.0, "save": 0.0}

    @contextlib.contextmanager
    def timing(self, what: str):
        t0 = time.time()
        yield
        self.seconds[what] = time.time() - t0

    def out_of_time(self) -> bool:
        return self.guard.out_of_time(self.seconds["step"], self.seconds["save"])


def progress_bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
