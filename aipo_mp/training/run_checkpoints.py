"""The run's step checkpoints: save (model, optimizer, RNG, progress; `latest` moves last),
load at any layout, resume from the newest complete one (resume.py decides which), prune."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional

import torch

from aipo_mp.config import Config, dump_config
from aipo_mp.errors import LATEST, TRAIN_STATE, UserError
from aipo_mp.runtime.files import atomic_write_json, atomic_write_text
from aipo_mp.training import manifest, optim, resume
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
    rng_entries = manifest.collect(path, [f"rng/{n.name}" for n in sorted(rng_dir.glob("rank_*.pt"))])
    if torch.distributed.get_rank() == 0:
        atomic_write_json(path / TRAIN_STATE, {"step": step, "layout": layout_dict(cfg),
                                                     "world_size": torch.distributed.get_world_size()})
        dump_config(cfg, path / "config.yaml")
        write_final_manifest(path, rng_entries)  # last before `latest`: a checkpoint listing train_state is complete
        atomic_write_text(checkpoint_root(cfg) / LATEST, path.name + "\n")
    torch.distributed.barrier()
    return path


def write_final_manifest(path: Path, rng_entries: dict) -> None:
    """(rank 0) save_model's manifest (model, optimizer, metadata: hashed by their writers) plus
    the RNG files (hashed by theirs) and the small files written here."""
    entries = {name: (size, crc) for name, (size, crc) in (manifest.read(path) or {}).items()}
    entries.update(rng_entries)
    for name in (TRAIN_STATE, "config.yaml"):
        entries[name] = ((path / name).stat().st_size, manifest.file_crc32(path / name))
    manifest.write(path, entries)


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


def load_checkpoint(state: "RunState", path: Path, verified: bool = False) -> int:
    """Weights and optimizer state at this run's layout, whatever layout saved them (resharded by
    dist_checkpointing); the RNG state only where the same rank existed (dropout is 0 in every
    shipped config: the data order is a pure function of the step). Every file is checked against
    the manifest first (each by the rank that wrote it, when that rank exists): CheckpointDamaged
    names the first bad one before anything is loaded."""
    from aipo_mp.runtime.json_files import read_json_object
    from aipo_mp.training.checkpoint import CheckpointDamaged, check_files, load_model, load_optimizer

    if not verified:
        check_files(path, "")
    info = read_json_object(path / TRAIN_STATE, "train state", {"step": int},
                            fix="the checkpoint is damaged; resume from an older one", error=CheckpointDamaged)
    check_expert_layout(info.get("layout") if isinstance(info.get("layout"), dict) else {}, state.cfg, path)
    load_model(state.built, path, verify=False)
    load_optimizer(state.optimizer, state.built, path, verify=False)
    rng = path / "rng" / rng_state_name()
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True)["torch_rng"])
    return int(info["step"])


def try_checkpoint(state: RunState, path: Path) -> tuple[Optional[int], Optional[str], bool]:
    """(step, None, _) when `path` loaded on every rank, else (None, why it did not, whether a
    load had begun and may have overwritten weights). A config that does not fit the checkpoint
    (another model, expert layout) is the user's to fix: it raises."""
    from aipo_mp.training.checkpoint import DAMAGED_FIX, CheckpointDamaged, check_files

    step, reason, began = None, None, False
    try:
        check_files(path, "")  # nothing is loaded from a checkpoint that fails here
        began = True
        step = load_checkpoint(state, path, verified=True)
    except CheckpointDamaged as e:
        reason = e.errors[0].replace(f"; {DAMAGED_FIX}", "")  # the fix here is the fallback
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged contents that load as something unexpected
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    gathered = manifest._gather((reason, began))  # every rank resumes from the same step
    reasons = [r for r, _ in gathered if r]
    began = any(b for r, b in gathered if r)
    return (None, reasons[0], began) if reasons else (step, None, False)


def resume_from_checkpoint(state: RunState) -> int:
    """Load the newest complete checkpoint, falling back past ones whose files are missing, short,
    fail their checksum or do not load (a `warning:` line each); the step it holds, or 0 when none
    is left (said in a warning line too)."""
    rank0 = torch.distributed.get_rank() == 0
    found, warnings = resume_candidates(state.cfg)
    touched = False  # a load that failed part-way may have overwritten some weights
    for k, path in enumerate(found):
        start, reason, began = try_checkpoint(state, path)
        if reason is None:
            if rank0:
                for line in warnings:
                    print(line, flush=True)
                print(f"resuming from {path} (step {start})", flush=True)
            return start
        touched = touched or began
        then = (f"falling back to {found[k + 1].name}" if k + 1 < len(found)
                else "no older complete checkpoint is left: starting from step 0")
        warnings.append(f"warning: checkpoint {path} does not load ({reason}); {then}")
    if touched:  # start from the configured weights again, and the optimizer's copy of them
        from aipo_mp.training.state import load_policy_weights

        load_policy_weights(state.built, state.cfg.model.path)
        state.optimizer.reload_model_params()
    if rank0:
        for line in warnings:
            print(line, flush=True)
    return 0


def keep_newest_checkpoints(cfg: Config, rank0: bool) -> None:
    """train.keep_checkpoints: rank 0 deletes older step checkpoints after a complete save."""
    if rank0:
        from aipo_mp.training.checkpoint import prune_checkpoints

        prune_checkpoints(checkpoint_root(cfg), cfg.train.keep_checkpoints, LATEST)
