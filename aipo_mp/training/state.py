"""What one rank trains with: its place in the layout, the run state, and set-up (process
groups, data, the policy's weights, the optimizer)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from aipo_mp import objectives
from aipo_mp.config import Config, ModelArch
from aipo_mp.data import prepare
from aipo_mp.models import get_family, read_hf_config
from aipo_mp.models.build import BuiltModel, build_model, freeze_routers, load_hf_weights
from aipo_mp.runtime import platform
from aipo_mp.training import identity as run_identity
from aipo_mp.training import optim
from aipo_mp.validate import validate


@dataclass
class Layout:
    tp_rank: int
    dp_rank: int
    dp_size: int
    last_stage: bool

    @staticmethod
    def current() -> "Layout":
        from megatron.core import parallel_state as ps

        return Layout(ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                      ps.get_data_parallel_world_size(), ps.is_pipeline_last_stage(ignore_virtual=True))

    @property
    def reports(self) -> bool:
        """One rank per data-parallel replica contributes reported sums (TP ranks agree)."""
        return self.last_stage and self.tp_rank == 0


def world_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (on the accelerator when there is one: NCCL reduces device tensors)."""
    on_device = t.to(platform.device())
    torch.distributed.all_reduce(on_device)
    if on_device is not t:
        t.copy_(on_device)
    return t


@dataclass
class RunState:
    cfg: Config
    arch: ModelArch
    built: BuiltModel
    chunks: list
    optimizer: object  # megatron MegatronOptimizer (see optim.py)
    params: list
    pairs: list
    ref_table: Optional[torch.Tensor]
    hf_config: dict
    tokenizer_dir: Optional[str]
    objective_params: dict
    layout: Layout
    total_steps: int
    needs_reference: bool = True
    moe_monitor: Optional[object] = None  # aipo_mp.training.routing.MoEMonitor for MoE policies
    stop: platform.StopSignal = field(default_factory=platform.StopSignal)
    stats: dict = field(default_factory=dict)


def tokenizer_dir_of(model_path: str) -> str:
    """HF dirs hold their tokenizer; aipo_mp checkpoints keep it under hf_extra/."""
    extra = Path(model_path) / "hf_extra"
    return str(extra if extra.is_dir() else model_path)


def load_policy_weights(built: BuiltModel, path: str) -> None:
    from aipo_mp.convert.common import hf_source
    from aipo_mp.training.checkpoint import is_megatron_checkpoint, load_model

    if is_megatron_checkpoint(path):
        load_model(built, path)
    else:  # names and shapes checked against config.json first, as inspect and hf-to-mcore do
        load_hf_weights(built, hf_source(path, pickle_flag=None).weights.get)  # train has no --allow-pickle


def prepare_data(cfg: Config, tokenizer_dir: str, vocab_size: Optional[int] = None):
    """(pairs, stats, data fingerprint) of data.train, tokenized once per job: global rank 0
    tokenizes and writes RUN_DIR/token_cache/pairs-KEY.npz (aipo_mp.data.prepare.cache_path);
    then the local rank 0 of any node that cannot see that file (node-local output disks) does the
    same on its node; every other rank reads the file after the barrier. A user error while
    tokenizing reaches every rank as the same line."""
    path = prepare.cache_path(cfg, tokenizer_dir, vocab_size)
    rank = torch.distributed.get_rank()
    local_rank = platform.read_dist_env(cfg.cluster.master_port or None).local_rank
    result = None
    if rank == 0:
        result = tokenize_or_raise(lambda: cached_or_tokenized(cfg, tokenizer_dir, vocab_size, path), "rank 0")
    else:
        tokenize_or_raise(None, "rank 0")
    if rank != 0 and local_rank == 0 and not path.is_file():  # this node does not see rank 0's file
        result = tokenize_or_raise(lambda: cached_or_tokenized(cfg, tokenizer_dir, vocab_size, path), f"rank {rank}")
    else:
        tokenize_or_raise(None, "the first rank of another node")
    if result is None:
        result = prepare.read_token_cache(path)
    if result is None:  # unreadable here (damaged, or a file system without the file): do it on this rank
        result = tokenize(cfg, tokenizer_dir, vocab_size)
    return result


def cached_or_tokenized(cfg: Config, tokenizer_dir: str, vocab_size: Optional[int], path: Path):
    """The cache file's content when it is there and readable, else tokenized now and written."""
    found = prepare.read_token_cache(path) if path.is_file() else None
    if found is not None:
        return found
    pairs, stats, fingerprint = tokenize(cfg, tokenizer_dir, vocab_size)
    try:
        prepare.write_token_cache(path, pairs, stats, fingerprint)
    except OSError as e:  # a full or read-only output dir: the other ranks tokenize for themselves
        print(f"warning: cannot write the token cache {path} ({e.strerror or e}); every rank tokenizes "
              "data.train itself", flush=True)
    return pairs, stats, fingerprint


def tokenize(cfg: Config, tokenizer_dir: str, vocab_size: Optional[int]):
    from aipo_mp.convert.hf_io import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, cfg.model.trust_remote_code)
    pairs, stats, records = prepare.prepare_pairs(cfg, tok, vocab_size)
    return pairs, stats, run_identity.records_fingerprint(records)


def tokenize_or_raise(fn, who: str):
    """Collective: `fn()` on the ranks that pass one; a user error there is raised with the same
    lines on every rank, any other failure stops every rank (the failing one keeps its traceback)."""
    from aipo_mp import errors

    if torch.distributed.get_world_size() == 1:
        return fn() if fn is not None else None
    result, outcome, failure = None, None, None
    if fn is not None:
        try:
            result = fn()
        except errors.UserError as e:
            outcome, failure = (type(e).__name__, e.errors), sys.exc_info()
        except BaseException:
            outcome, failure = ("", []), sys.exc_info()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, outcome)
    outcome = next((o for o in gathered if o is not None), None) if outcome is None else outcome
    if failure is not None:  # the failing rank raises its own exception
        raise failure[1].with_traceback(failure[2])
    if outcome is not None:
        name, lines = outcome
        if not name:
            raise RuntimeError(f"{who} failed while tokenizing data.train (its error is reported there)")
        raise getattr(errors, name, errors.UserError)(lines)
    return result


def setup(cfg: Config) -> RunState:
    env = platform.init_distributed(cfg.cluster.master_port or None)
    arch = validate(cfg, world_size=env.world_size)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    par = cfg.parallel
    platform.initialize_model_parallel(par.tp, par.pp, par.vpp, par.cp, ep=par.ep, etp=par.etp)
    platform.seed_model_parallel_rng(cfg.train.seed)
    lay = Layout.current()
    tokenizer_dir = tokenizer_dir_of(cfg.model.path)
    pairs, data_stats, data_fingerprint = prepare_data(cfg, tokenizer_dir, arch.vocab_size)
    built = build_model(get_family(arch.family), arch, par, cfg.precision, cfg.train.recompute, initialize=False,
                        moe=cfg.moe)
    load_policy_weights(built, cfg.model.path)
    if cfg.moe.freeze_router:
        freeze_routers(built.chunks)
    objective = objectives.get_objective(cfg.objective.name)
    obj_params = objectives.resolve_params(cfg.objective.name, known_params(cfg))
    total = cfg.train.steps or max(1, len(pairs) // cfg.train.global_batch_pairs)
    chunks = optim.wrap_ddp(built, cfg)
    params = trainable_params(chunks)
    state = RunState(cfg, arch, built, chunks, optim.build_optimizer(chunks, cfg), params, pairs, None,
                     read_hf_config(cfg.model.path), tokenizer_dir, obj_params, lay, total)
    state.stats["data"] = data_stats
    state.stats["identity"] = identity = run_identity.run_identity(cfg, [], obj_params)
    identity["data"] = data_fingerprint  # the pairs as read (ranks reading the token cache have no records)
    state.needs_reference = objective.needs_reference
    return state


def known_params(cfg: Config) -> dict:
    """Hyperparameters of the chosen objective; keys that belong only to other objectives are
    ignored (config validation has warned about them)."""
    valid = objectives.get_objective(cfg.objective.name).defaults
    return {k: v for k, v in cfg.objective.params.items() if k in valid}


def trainable_params(chunks) -> list[torch.nn.Parameter]:
    return [p for c in chunks for p in c.parameters() if p.requires_grad]
