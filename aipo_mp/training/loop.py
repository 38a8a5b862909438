"""The preference training loop: policy (and a frozen reference) in one Megatron process group,
any TP/PP/VPP/SP/DP layout, packed pairs, resumable checkpoints. Runs on every rank; read it
top-down from `train`.

Per step: the global batch (train.global_batch_pairs pairs, a pure function of the step, so a
resumed run sees the same data) is split over data-parallel ranks by estimated cost, packed into
rows of at most train.seq_length tokens sized to their content (one row = one micro-batch, the
same number on every rank), and run through megatron's pipeline schedule. The loss of each row is
scaled so that the gradient is that of the mean over the global batch.

The parts, one file each: state.py (set-up and the run state), batches.py (data order, rows),
reference.py (reference log-probs and their cache), metrics.py (what a step reports),
run_checkpoints.py (save, load, resume, prune), optim.py, forward.py, logprobs.py, guards.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from aipo_mp import errors, objectives
from aipo_mp.config import Config, dump_config
from aipo_mp.data import prepare
from aipo_mp.errors import UserError
from aipo_mp.runtime import platform
from aipo_mp.training import guards, optim
from aipo_mp.training import identity as run_identity
from aipo_mp.training.batches import row_batch, step_rows
from aipo_mp.training.forward import model_forward
from aipo_mp.training.metrics import MetricsLog, StepClock, accumulate, progress_bar, summarize_step
from aipo_mp.training.reference import compute_reference, row_sequence_logps
from aipo_mp.training.run_checkpoints import (
    checkpoint_root,
    keep_newest_checkpoints,
    resume_from_checkpoint,
    save_checkpoint,
)
from aipo_mp.training.state import RunState, setup


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


def run_loop(state: RunState) -> RunState:
    cfg = state.cfg
    rank0 = torch.distributed.get_rank() == 0
    if state.needs_reference:  # before resuming: the weights are still the initial policy's
        optim.sync_weights(state.chunks)
        state.ref_table = compute_reference(state).to(platform.device())  # indexed on the device per row
    if state.arch.num_experts:  # before resuming: the probe records the initial policy's routing
        from aipo_mp.training.routing import MoEMonitor

        state.moe_monitor = MoEMonitor(state)
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
        output = model_forward(model, batch["tokens"], batch["cu_seqlens"], batch["max_seqlen"],
                               batch.get("padding_mask"))

        def loss_func(logits):
            if not len(row.pair_indices):
                return logits.sum() * 0.0, {}
            losses, metrics = pair_losses(state, logits, batch)
            accumulate(sums, losses, metrics)
            return losses.sum() * scale, {}

        return output, loss_func

    optim.zero_grads(state.chunks, state.optimizer)
    iters = [iter([row_batch(r, padding_mask=bool(state.arch.num_experts)) for r in rows]) for _ in state.chunks]
    t0 = time.perf_counter()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=state.chunks if len(state.chunks) > 1 else state.chunks[0],
        num_microbatches=len(rows),
        seq_length=rows[0].tokens.numel(),  # rows are sized to content; under PP all of a step's are equal
        micro_batch_size=1,
        forward_only=False,
    )
    lr = schedule_lr(step + 1, state.total_steps, cfg.train)
    optim.set_lr(state.optimizer, lr, cfg.train.weight_decay)
    _, grad_norm = optim.step(state.optimizer)
    elapsed = time.perf_counter() - t0
    record = summarize_step(state, step, sums, rows, grad_norm, lr, elapsed)
    if state.moe_monitor is not None:
        record.update(state.moe_monitor.step_metrics(len(rows)))
    return record


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


def stop_agreed(state: RunState) -> bool:
    flag = torch.tensor([1.0 if state.stop.requested else 0.0], device=platform.device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


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
    fresh = run_identity.check_identity(out, identity, cfg)  # read-only: every rank raises alike
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


def write_handoff(state: RunState) -> None:
    """The final policy as an HF directory for the next round's vLLM engines (aipo_mp.convert.handoff)."""
    from aipo_mp.convert.handoff import write_policy_hf

    path = write_policy_hf(state.built, state.cfg.output.hf_dir, state.hf_config, state.tokenizer_dir,
                           state.cfg.precision.dtype)
    if torch.distributed.get_rank() == 0:
        print(f"policy for vLLM written to {path}", flush=True)
