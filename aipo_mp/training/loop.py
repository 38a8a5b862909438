"""The preference training loop: policy (and a frozen reference) in one Megatron process group,
any TP/PP/VPP/SP/DP layout, packed pairs, resumable checkpoints. Runs on every rank.

Per step: the global batch (train.global_batch_pairs pairs, a pure function of the step, so a
resumed run sees the same data) is split over data-parallel ranks, packed into rows of
train.seq_length (one row = one micro-batch), and run through megatron's pipeline schedule. The
loss of each row is scaled so that the gradient is that of the mean over the global batch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from aipo_mp import errors, objectives
from aipo_mp.config import Config, ModelArch, dump_config
from aipo_mp.data import prepare
from aipo_mp.data.pairs import PackedRow, pack_pairs
from aipo_mp.errors import LATEST, TRAIN_STATE, ConfigError, UserError
from aipo_mp.models import get_family, read_hf_config
from aipo_mp.models.build import BuiltModel, build_model, load_hf_weights
from aipo_mp.runtime import platform
from aipo_mp.runtime.files import atomic_write_json, atomic_write_text
from aipo_mp.training import guards, optim, resume
from aipo_mp.training import identity as run_identity
from aipo_mp.training.forward import forward_only, model_forward
from aipo_mp.training.logprobs import sequence_logprobs, token_logprobs
from aipo_mp.validate import validate

# ---------------------------------------------------------------------------------------------
# Data order and batching: pure functions of (step, seed) so resume needs only the step
# ---------------------------------------------------------------------------------------------


def global_batch_indices(step: int, num_pairs: int, batch: int, seed: int, shuffle: bool) -> list[int]:
    """Pair indices of 0-based optimizer step `step`: consecutive batches over epochs, each epoch
    a fresh permutation (seeded), so any step's batch is known without replaying the run."""
    out = []
    start = step * batch
    for pos in range(start, start + batch):
        epoch, offset = divmod(pos, num_pairs)
        out.append(int(epoch_order(epoch, num_pairs, seed, shuffle)[offset]))
    return out


_ORDER_CACHE: dict = {}


def epoch_order(epoch: int, n: int, seed: int, shuffle: bool) -> torch.Tensor:
    key = (epoch, n, seed, shuffle)
    if key not in _ORDER_CACHE:
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch)
            _ORDER_CACHE[key] = torch.randperm(n, generator=g)
        else:
            _ORDER_CACHE[key] = torch.arange(n)
    return _ORDER_CACHE[key]


def schedule_lr(step: int, total: int, cfg) -> float:
    """Learning rate of 1-based step `step`: linear warmup, then cosine / linear / constant."""
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_ratio * total))
    if warmup and step <= warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant" or total <= warmup:
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Parallel helpers
# ---------------------------------------------------------------------------------------------


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


def pad_rows(rows: list[PackedRow], multiple: int, seq_length: int) -> list[PackedRow]:
    """The interleaved schedule needs a multiple of pp micro-batches: add empty (all padding) rows."""
    while multiple > 1 and len(rows) % multiple:
        rows.append(empty_row(seq_length))
    return rows


def empty_row(seq_length: int) -> PackedRow:
    return PackedRow(
        tokens=torch.zeros(seq_length, dtype=torch.long),
        labels=torch.zeros(seq_length, dtype=torch.long),
        loss_mask=torch.zeros(seq_length, dtype=torch.bool),
        segment_ids=torch.full((seq_length,), -1, dtype=torch.long),
        cu_seqlens=torch.tensor([0, seq_length], dtype=torch.int32),
        max_seqlen=seq_length,
        pair_indices=torch.zeros(0, dtype=torch.long),
        chosen_lengths=torch.zeros(0, dtype=torch.long),
        rejected_lengths=torch.zeros(0, dtype=torch.long),
        num_real_tokens=0,
    )


ROW_TENSORS = ("labels", "loss_mask", "segment_ids", "pair_indices", "chosen_lengths", "rejected_lengths")


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host -> device without a pageable copy or a sync: pinned staging, non-blocking copy."""
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def row_batch(row: PackedRow) -> dict:
    """One micro-batch: every tensor the forward and the loss need, moved to the device once
    (the loss function then never copies or syncs); `row` keeps the host-side counts."""
    dev = platform.device()
    batch = {"tokens": to_device(row.tokens[None], dev), "cu_seqlens": to_device(row.cu_seqlens, dev),
             "max_seqlen": row.max_seqlen, "row": row}
    batch.update({name: to_device(getattr(row, name), dev) for name in ROW_TENSORS})
    return batch


def row_sequence_logps(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs of the pairs in a row; logits [1, T, V/tp]."""
    tok = token_logprobs(logits[0], batch["labels"])
    seq = sequence_logprobs(tok, batch["loss_mask"], batch["segment_ids"], 2 * len(batch["row"].pair_indices))
    return seq[0::2], seq[1::2]


# ---------------------------------------------------------------------------------------------
# Reference log-probs
# ---------------------------------------------------------------------------------------------


def reference_logps(built: BuiltModel, pairs, cfg: Config, lay: Layout) -> torch.Tensor:
    """[num_pairs, 2] (chosen, rejected) log-probs under `built`, one forward-only pass over all
    pairs split across data-parallel ranks; every rank receives the full table."""
    mine = [p for p in pairs if p.index % lay.dp_size == lay.dp_rank]
    rows = pack_pairs(mine, cfg.train.seq_length, cfg.train.micro_batch_pairs)
    rows = pad_rows(rows, cfg.parallel.pp if cfg.parallel.vpp > 1 else 1, cfg.train.seq_length)
    table = torch.zeros(len(pairs), 2, dtype=torch.float32, device=platform.device())

    def collect(logits, batch):
        if len(batch["row"].pair_indices):  # every TP rank joins the vocab-parallel collectives
            c, r = row_sequence_logps(logits, batch)
            if lay.tp_rank == 0:
                table[batch["pair_indices"], 0] = c.float()
                table[batch["pair_indices"], 1] = r.float()

    for chunk in built.chunks:
        chunk.eval()
    if rows:
        forward_only(built.chunks, [row_batch(r) for r in rows], collect, cfg.train.seq_length, built.arch.hidden_size)
    for chunk in built.chunks:
        chunk.train()
    return world_sum(table).cpu()


def trainable_params(chunks) -> list[torch.nn.Parameter]:
    return [p for c in chunks for p in c.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


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
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "sequence_parallel": p.sequence_parallel}


def load_checkpoint(state: "RunState", path: Path) -> int:
    """Weights and optimizer state at this run's layout, whatever layout saved them (resharded by
    dist_checkpointing); the RNG state only where the same rank existed (dropout is 0 in every
    shipped config: the data order is a pure function of the step)."""
    from aipo_mp.training.checkpoint import load_model, load_optimizer

    load_model(state.built, path)
    load_optimizer(state.optimizer, state.built, path)
    rng = path / "rng" / rng_state_name()
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True)["torch_rng"])
    info = json.loads((path / TRAIN_STATE).read_text())
    return int(info["step"])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class RunState:
    cfg: Config
    arch: ModelArch
    built: BuiltModel
    chunks: list
    optimizer: object  # megatron MegatronOptimizer (see aipo_mp/optim.py)
    params: list
    pairs: list
    ref_table: Optional[torch.Tensor]
    hf_config: dict
    tokenizer_dir: Optional[str]
    objective_params: dict
    layout: Layout
    total_steps: int
    needs_reference: bool = True
    stop: platform.StopSignal = field(default_factory=platform.StopSignal)
    stats: dict = field(default_factory=dict)


def tokenizer_dir_of(model_path: str) -> str:
    """HF dirs hold their tokenizer; aipo_mp checkpoints keep it under hf_extra/."""
    extra = Path(model_path) / "hf_extra"
    return str(extra if extra.is_dir() else model_path)


def load_policy_weights(built: BuiltModel, path: str) -> None:
    from aipo_mp.convert.hf_io import HFWeights
    from aipo_mp.training.checkpoint import is_megatron_checkpoint, load_model

    if is_megatron_checkpoint(path):
        load_model(built, path)
    else:
        load_hf_weights(built, HFWeights(path, pickle_flag=None).get)  # train has no --allow-pickle


def prepare_data(cfg: Config, tokenizer_dir: str, vocab_size: Optional[int] = None):
    """(pairs, stats, normalized records) of data.train (see aipo_mp.data.prepare)."""
    from aipo_mp.convert.hf_io import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, cfg.model.trust_remote_code)
    return prepare.prepare_pairs(cfg, tok, vocab_size)


def setup(cfg: Config) -> RunState:
    env = platform.init_distributed(cfg.cluster.master_port or None)
    arch = validate(cfg, world_size=env.world_size)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    par = cfg.parallel
    platform.initialize_model_parallel(par.tp, par.pp, par.vpp, par.cp)
    platform.seed_model_parallel_rng(cfg.train.seed)
    lay = Layout.current()
    tokenizer_dir = tokenizer_dir_of(cfg.model.path)
    pairs, data_stats, records = prepare_data(cfg, tokenizer_dir, arch.vocab_size)
    built = build_model(get_family(arch.family), arch, par, cfg.precision, cfg.train.recompute, initialize=False)
    load_policy_weights(built, cfg.model.path)
    objective = objectives.get_objective(cfg.objective.name)
    obj_params = objectives.resolve_params(cfg.objective.name, known_params(cfg))
    total = cfg.train.steps or max(1, len(pairs) // cfg.train.global_batch_pairs)
    chunks = optim.wrap_ddp(built, cfg)
    params = trainable_params(chunks)
    state = RunState(cfg, arch, built, chunks, optim.build_optimizer(chunks, cfg), params, pairs, None,
                     read_hf_config(cfg.model.path), tokenizer_dir, obj_params, lay, total)
    state.stats["data"] = data_stats
    state.stats["identity"] = run_identity.run_identity(cfg, records, obj_params)
    state.needs_reference = objective.needs_reference
    return state


def known_params(cfg: Config) -> dict:
    """Hyperparameters of the chosen objective; keys that belong only to other objectives are
    ignored (config validation has warned about them)."""
    valid = objectives.get_objective(cfg.objective.name).defaults
    return {k: v for k, v in cfg.objective.params.items() if k in valid}


def compute_reference(state: RunState) -> torch.Tensor:
    """Reference log-probs of every pair, saved beside the run (keyed by the data and weights they
    come from) so a resumed run reuses them. Called before a checkpoint is loaded, so in mode
    initial they always come from the initial weights."""
    cfg = state.cfg
    path = Path(cfg.output.dir) / "reference_logps.pt"
    key = run_identity.reference_key(state.stats["identity"])
    if path.exists():  # keyed by what it was computed from; another key is recomputed
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and saved.get("key") == key and saved["table"].shape == (len(state.pairs), 2):
            return saved["table"]
        if isinstance(saved, torch.Tensor) and saved.shape == (len(state.pairs), 2):
            return saved  # written before tables were keyed; the run identity check guards its data
    if cfg.reference.mode == "model":
        from aipo_mp.models import arch_from_dir

        ref_arch = arch_from_dir(cfg.reference.path)
        if ref_arch != state.arch:
            raise ConfigError(f"reference.path={cfg.reference.path} has a different architecture from the policy; "
                              "the reference must be the same model family and size")
        ref = build_model(get_family(ref_arch.family), ref_arch, cfg.parallel, cfg.precision, initialize=False)
        for p in (p for c in ref.chunks for p in c.parameters()):
            p.requires_grad_(False)
        load_policy_weights(ref, cfg.reference.path)
        table = reference_logps(ref, state.pairs, cfg, state.layout)
        del ref  # frees the reference before training
    else:
        table = reference_logps(state.built, state.pairs, cfg, state.layout)
    guards.check_reference(table)  # NaN weights: stop before training on them
    if torch.distributed.get_rank() == 0:
        tmp = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "table": table}, tmp)
        tmp.replace(path)
    torch.distributed.barrier()
    return table


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------


def step_rows(state: RunState, step: int) -> list[PackedRow]:
    cfg, lay = state.cfg, state.layout
    batch = global_batch_indices(step, len(state.pairs), cfg.train.global_batch_pairs, cfg.train.seed, cfg.data.shuffle)
    per_rank = len(batch) // lay.dp_size
    mine = [state.pairs[i] for i in batch[lay.dp_rank * per_rank:(lay.dp_rank + 1) * per_rank]]
    rows = pack_pairs(mine, cfg.train.seq_length, cfg.train.micro_batch_pairs)
    return pad_rows(rows, cfg.parallel.pp if cfg.parallel.vpp > 1 else 1, cfg.train.seq_length)


def train_step(state: RunState, step: int) -> dict:
    """Forward/backward over this rank's rows of global batch `step` (0-based), then the update."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, lay = state.cfg, state.layout
    rows = step_rows(state, step)
    global_pairs = cfg.train.global_batch_pairs
    # Schedule divides each row's loss by len(rows); DDP averages over dp: undo both, divide by G.
    scale = len(rows) * lay.dp_size / global_pairs
    sums: dict[str, torch.Tensor] = {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        row = batch["row"]
        output = model_forward(model, batch["tokens"], batch["cu_seqlens"], batch["max_seqlen"])

        def loss_func(logits):
            if not len(row.pair_indices):
                return logits.sum() * 0.0, {}
            losses, metrics = pair_losses(state, logits, batch)
            accumulate(sums, losses, metrics)
            return losses.sum() * scale, {}

        return output, loss_func

    optim.zero_grads(state.chunks, state.optimizer)
    iters = [iter([row_batch(r) for r in rows]) for _ in state.chunks]
    t0 = time.perf_counter()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=state.chunks if len(state.chunks) > 1 else state.chunks[0],
        num_microbatches=len(rows),
        seq_length=cfg.train.seq_length,
        micro_batch_size=1,
        forward_only=False,
    )
    lr = schedule_lr(step + 1, state.total_steps, cfg.train)
    optim.set_lr(state.optimizer, lr, cfg.train.weight_decay)
    _, grad_norm = optim.step(state.optimizer)
    elapsed = time.perf_counter() - t0
    return summarize_step(state, step, sums, rows, grad_norm, lr, elapsed)


def pair_losses(state: RunState, logits: torch.Tensor, batch: dict):
    chosen, rejected = row_sequence_logps(logits, batch)
    dev = chosen.device
    ref = state.ref_table.to(dev)[batch["pair_indices"]] if state.ref_table is not None else None
    logps = objectives.PairLogps(
        policy_chosen=chosen,
        policy_rejected=rejected,
        reference_chosen=None if ref is None else ref[:, 0],
        reference_rejected=None if ref is None else ref[:, 1],
        chosen_lengths=batch["chosen_lengths"],
        rejected_lengths=batch["rejected_lengths"],
    )
    return objectives.compute(state.cfg.objective.name, logps, state.objective_params)


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
              torch.tensor(float(len(rows) * cfg.train.seq_length), dtype=torch.float64, device=dev)]
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


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (rank 0), trimmed on resume to the steps the checkpoint covers, and
    TensorBoard event files."""

    def __init__(self, cfg: Config, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(cfg.output.dir) / "metrics.jsonl"
        self.tb = None
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

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def stop_agreed(state: RunState) -> bool:
    flag = torch.tensor([1.0 if state.stop.requested else 0.0], device=platform.device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def train(cfg: Config, stop: Optional[platform.StopSignal] = None) -> RunState:
    """Train on this rank; returns the run state (model; last metrics in state.stats["last"];
    state.stats["stopped"] when a signal ended the run early, progress saved)."""
    from aipo_mp.runtime.locks import Lock

    stop = stop or platform.StopSignal().install()
    platform.init_distributed(cfg.cluster.master_port or None)  # (setup's call is then a no-op)
    # Before reading data or weights: a second command on a busy directory fails at once.
    lock = rank0_then_agree(lambda: Lock(cfg.output.dir, "aipo-mp train").acquire())
    try:
        state = setup(cfg)
        state.stop = stop
        claim_output_dir(state)
        return run_loop(state)
    finally:
        if lock is not None:
            lock.release()


def rank0_then_agree(fn):
    """`fn()` on rank 0; a user error there is raised with the same message on every rank (no
    rank is left waiting in a collective). Returns fn's result on rank 0, None elsewhere."""
    rank0 = torch.distributed.get_rank() == 0
    result, message = None, [None]
    if rank0:
        try:
            result = fn()
        except UserError as e:
            message = [(type(e).__name__, e.errors)]
        except OSError as e:  # a read-only or full output directory
            from aipo_mp.errors import disk_error_line

            if disk_error_line(e) is None:
                raise
            message = [("UserError", [disk_error_line(e)])]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(message, src=0, device=platform.device())
    if message[0] is not None:
        name, lines = message[0]
        raise getattr(errors, name, UserError)(lines)
    return result


def claim_output_dir(state: RunState) -> None:
    """Refuse a directory holding another run (before anything is written), then record this
    run's identity, config and data report."""
    cfg, out = state.cfg, Path(state.cfg.output.dir)
    identity = state.stats["identity"]
    fresh = run_identity.check_identity(out, identity)  # read-only: every rank raises alike
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            run_identity.record_identity(out, identity)
        dump_config(cfg, out / "config.yaml")
        prepare.save_stats(state.stats["data"], out)
        for line in prepare.report_lines(state.stats["data"], cfg) + list(getattr(cfg, "notes", [])):
            print(line, flush=True)
    torch.distributed.barrier()


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


def run_loop(state: RunState) -> RunState:
    cfg = state.cfg
    rank0 = torch.distributed.get_rank() == 0
    if state.needs_reference:  # before resuming: the weights are still the initial policy's
        optim.sync_weights(state.chunks)
        state.ref_table = compute_reference(state).to(platform.device())  # indexed on the device per row
    start = resume_from_checkpoint(state)
    log = MetricsLog(cfg, start, rank0)
    bar = progress_bar(rank0, state.total_steps, start)
    record, saved_at = {}, start
    state.stats["stopped"] = stop_agreed(state)  # a signal during set-up: nothing new to save
    clock = StepClock()
    try:
        for step in range(start, state.total_steps if not state.stats["stopped"] else start):
            with clock.timing("step"):
                record = train_step(state, step)
            # After the update but before anything is logged or saved: a non-finite step never reaches disk.
            guards.check_step(step + 1, "the gradient norm", record["grad_norm"])
            guards.check_step(step + 1, "the loss", record["loss"])
            log.write(record)
            if bar:
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracy', 0):.2f}")
                bar.update(1)
            done = step + 1
            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == state.total_steps:
                with clock.timing("save"):
                    save_checkpoint(state, done)
                saved_at = done
                keep_newest_checkpoints(cfg, rank0)
            if clock.out_of_time():  # the job ends before another step and a save would: save now
                state.stop.requested = True
            if stop_agreed(state):
                if saved_at != done:
                    save_checkpoint(state, done)
                    keep_newest_checkpoints(cfg, rank0)
                state.stats["stopped"] = True
                break
        optim.sync_weights(state.chunks)  # state.built holds the trained weights for the caller
    finally:
        if bar:
            bar.close()
        log.close()
    if rank0 and state.stats["stopped"]:
        print(f"stopped by signal after step {record.get('step', start)}; progress saved. Rerun the same command "
              "to resume.", flush=True)
    elif rank0 and record:
        print(f"done: {record['step']} steps, loss {record['loss']:.4f}, "
              f"accuracy {record.get('rewards/accuracy', float('nan')):.3f}, checkpoint {checkpoint_root(cfg)}",
              flush=True)
    elif rank0 and start >= state.total_steps:
        print(f"already complete: {start} of {state.total_steps} steps in {checkpoint_root(cfg)}; nothing to do",
              flush=True)
    if cfg.output.hf_dir and not state.stats["stopped"]:
        write_handoff(state)
    state.stats["last"] = record
    return state


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


def keep_newest_checkpoints(cfg: Config, rank0: bool) -> None:
    """train.keep_checkpoints: rank 0 deletes older step checkpoints after a complete save."""
    if rank0:
        from aipo_mp.training.checkpoint import prune_checkpoints

        prune_checkpoints(checkpoint_root(cfg), cfg.train.keep_checkpoints, LATEST)


def write_handoff(state: RunState) -> None:
    """The final policy as an HF directory for the next round's vLLM engines (aipo_mp.convert.handoff)."""
    from aipo_mp.convert.handoff import write_policy_hf

    path = write_policy_hf(state.built, state.cfg.output.hf_dir, state.hf_config, state.tokenizer_dir,
                           state.cfg.precision.dtype)
    if torch.distributed.get_rank() == 0:
        print(f"policy for vLLM written to {path}", flush=True)


def progress_bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
