"""The run's step checkpoints: save (model, optimizer, RNG, progress; `latest` moves last),
load at any layout, resume from the newest complete one (resume.py decides which), prune."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Optional

import torch

from aipo_mp.config import Config, dump_config
from aipo_mp.errors import LATEST, TRAIN_STATE, UserError
from aipo_mp.runtime.files import atomic_write_json, atomic_write_text
from aipo_mp.training import optim, resume
from aipo_mp.training.state import RunState


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.output.dir) / "checkpoints"


def latest_checkpoint(cfg: Config) -> Optional[Path]:
    """The newest complete checkpoint (see aipo_mp.training.resume)."""
    found, _ = resume_candidates(cfg)
    return found[0] if found else None


def resume_candidates(cfg: Config) -> tuple[list[Path], list[str]]:
    pointer = checkpoint_root(cfg) / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    return resume.candidates(checkpoint_root(cfg), named)


def rng_state_name() -> str:
    return f"rank_{torch.distributed.get_rank():05d}_of_{torch.distributed.get_world_size():05d}.pt"


def save_checkpoint(state: "RunState", step: int) -> Path:
    """Model and optimizer (megatron dist checkpoints; any TP/PP/VPP/DP layout loads them), the
    RNG state per rank, progress; `latest` is written last, atomically, so a partial checkpoint
    is never used."""
    from aipo_mp.training.checkpoint import save_model

    cfg = state.cfg
    optim.sync_weights(state.chunks)
    path = checkpoint_root(cfg) / f"step_{step:07d}"
    save_model(state.built, path, hf_config=state.hf_config, extra_files_from=state.tokenizer_dir,
               dtype=cfg.precision.dtype, optimizer=state.optimizer)
    rng_dir = path / "rng"
    rng_dir.mkdir(exist_ok=True)
    tmp = rng_dir / (rng_state_name() + ".tmp")
    try:
        torch.save({"torch_rng": torch.get_rng_state()}, tmp)
    except BaseException as e:
        from aipo_mp.training.checkpoint import disk_is_full

        full = isinstance(e, RuntimeError) and disk_is_full(rng_dir)  # torch reports a short write, not ENOSPC
        tmp.unlink(missing_ok=True)  # no half-written file; the step gets no manifest, so no resume uses it
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(rng_dir)) from e
        raise
    tmp.replace(rng_dir / rng_state_name())
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        atomic_write_json(path / TRAIN_STATE, {"step": step, "layout": layout_dict(cfg),
                                                     "world_size": torch.distributed.get_world_size()})
        dump_config(cfg, path / "config.yaml")
        resume.write_manifest(path)  # last before `latest`: a checkpoint with a manifest is complete
        atomic_write_text(checkpoint_root(cfg) / LATEST, path.name + "\n")
    torch.distributed.barrier()
    return path


def layout_dict(cfg: Config) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "sequence_parallel": p.sequence_parallel, "ep": p.ep, "etp": p.etp}


def check_expert_layout(saved: dict, cfg: Config, path: Path) -> None:
    """With ep > 1 megatron keeps the experts' optimizer states in their own optimizer (a chained
    pair); with ep = 1 in the one optimizer. The weights load at any ep; the optimizer state only
    on the same side of that line."""
    was, now = saved.get("ep", 1), cfg.parallel.ep
    if (was > 1) != (now > 1):
        from aipo_mp.errors import CheckpointError

        raise CheckpointError(f"{path} was saved at parallel.ep={was}; its optimizer state resumes only at "
                              f"parallel.ep {'> 1' if was > 1 else '= 1'} (megatron keeps expert optimizer states "
                              f"apart when ep > 1): set parallel.ep accordingly, or start a new run from its weights "
                              f"with model.path={path}")


def load_checkpoint(state: "RunState", path: Path) -> int:
    """Weights and optimizer state at this run's layout, whatever layout saved them (resharded by
    dist_checkpointing); the RNG state only where the same rank existed (dropout is 0 in every
    shipped config: the data order is a pure function of the step)."""
    from aipo_mp.training.checkpoint import load_model, load_optimizer

    info = json.loads((path / TRAIN_STATE).read_text())
    check_expert_layout(info.get("layout", {}), state.cfg, path)
    load_model(state.built, path)
    load_optimizer(state.optimizer, state.built, path)
    rng = path / "rng" / rng_state_name()
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True)["torch_rng"])
    return int(info["step"])


def resume_from_checkpoint(state: RunState) -> int:
    """Load the newest complete checkpoint (falling back past damaged ones); the step it holds."""
    rank0 = torch.distributed.get_rank() == 0
    found, warnings = resume_candidates(state.cfg)
    for path in found:
        try:
            start = load_checkpoint(state, path)
        except UserError:
            raise
        except Exception as e:  # damaged contents the manifest cannot see (same size, bad bytes)
            warnings.append(f"warning: checkpoint {path} does not load ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]}); falling back to an older one")
            continue
        if rank0:
            for line in warnings:
                print(line, flush=True)
            print(f"resuming from {path} (step {start})", flush=True)
        return start
    if rank0:
        for line in warnings:
            print(line, flush=True)
    return 0


def keep_newest_checkpoints(cfg: Config, rank0: bool) -> None:
    """train.keep_checkpoints: rank 0 deletes older step checkpoints after a complete save."""
    if rank0:
        from aipo_mp.training.checkpoint import prune_checkpoints

        prune_checkpoints(checkpoint_root(cfg), cfg.train.keep_checkpoints, LATEST)
