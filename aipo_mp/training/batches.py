"""Which pairs a step trains on and how they become micro-batches: the data order is a pure
function of (step, seed), so a resumed run needs only the step; each data-parallel rank packs
its share of the global batch into rows of train.seq_length (one row = one micro-batch)."""

from __future__ import annotations

import torch

from aipo_mp.data.pairs import PackedRow, pack_pairs
from aipo_mp.runtime import platform
from aipo_mp.training.state import RunState


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


def pad_rows(rows: list[PackedRow], multiple: int, seq_length: int) -> list[PackedRow]:
    """The interleaved schedule needs a multiple of pp micro-batches: add empty (all padding) rows."""
    while multiple > 1 and len(rows) % multiple:
        rows.append(empty_row(seq_length))
    return rows


def schedule_rows(rows: list[PackedRow], cfg) -> list[PackedRow]:
    """A rank's rows as the pipeline schedule runs them: a multiple of pp for the interleaved
    schedule and, with expert parallelism, as many on every rank (each micro-batch's token
    all-to-all needs every rank of the expert group, which spans data-parallel replicas whose
    pairs pack into different row counts; a padding row carries no loss and no routed token)."""
    par = cfg.parallel
    rows = pad_rows(rows, par.pp if par.vpp > 1 else 1, cfg.train.seq_length)
    if par.ep > 1:
        most = torch.tensor(float(len(rows)), device=platform.device())
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        rows += [empty_row(cfg.train.seq_length) for _ in range(int(most) - len(rows))]
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


def row_batch(row: PackedRow, padding_mask: bool = False) -> dict:
    """One micro-batch: every tensor the forward and the loss need, moved to the device once
    (the loss function then never copies or syncs); `row` keeps the host-side counts.
    padding_mask: add the [1, T] mask (True: padding) megatron's MoE routers take, so padding
    never counts in the load-balancing loss or the expert-load metrics."""
    dev = platform.device()
    batch = {"tokens": to_device(row.tokens[None], dev), "cu_seqlens": to_device(row.cu_seqlens, dev),
             "max_seqlen": row.max_seqlen, "row": row}
    batch.update({name: to_device(getattr(row, name), dev) for name in ROW_TENSORS})
    if padding_mask:
        batch["padding_mask"] = batch["segment_ids"][None] < 0
    return batch


def step_rows(state: RunState, step: int) -> list[PackedRow]:
    cfg, lay = state.cfg, state.layout
    batch = global_batch_indices(step, len(state.pairs), cfg.train.global_batch_pairs, cfg.train.seed, cfg.data.shuffle)
    per_rank = len(batch) // lay.dp_size
    mine = [state.pairs[i] for i in batch[lay.dp_rank * per_rank:(lay.dp_rank + 1) * per_rank]]
    rows = pack_pairs(mine, cfg.train.seq_length, cfg.train.micro_batch_pairs)
    return schedule_rows(rows, cfg)
