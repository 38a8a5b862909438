"""Which pairs a step trains on and how they become micro-batches: the data order is a pure
function of (step, seed), so a resumed run needs only the step. The global batch is divided
among data-parallel ranks by estimated cost (Karmarkar-Karp), each rank packs its share into rows
of at most train.seq_length tokens, each row padded only to what the layout needs to divide it
(one row = one micro-batch), and every rank runs the same number of rows. All of it is a pure
function of the step, so a resumed run trains the same pairs on the same ranks."""

from __future__ import annotations

import dataclasses
import heapq
import math

import torch

from aipo_mp.data.pairs import PackedRow, TokenizedPair, pack_pairs
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


# ---------------------------------------------------------------------------------------------
# Cost-balanced split of a batch over data-parallel ranks
# ---------------------------------------------------------------------------------------------


def attention_cost_coefficient(arch) -> float:
    """Cost of one query-key position relative to one token through the layer's weights: per
    token a layer spends ~2 x its parameters in the matmuls and ~2 x heads x head_dim per earlier
    position in attention (q.k and p.v, causal), so a sequence of L tokens costs
    L + coeff x L^2 token-equivalents."""
    from aipo_mp.models import num_params

    per_layer = num_params(arch, active=True) / max(1, arch.num_layers)
    return arch.num_attention_heads * arch.head_dim / max(1.0, per_layer)


def pair_cost(pair: TokenizedPair, coeff: float) -> float:
    """Estimated compute of a pair's two sequences: tokens plus the attention's quadratic term."""
    lengths = (len(pair.prompt) + len(pair.chosen), len(pair.prompt) + len(pair.rejected))
    return float(sum(n + coeff * n * n for n in lengths))


# Above this many items x parts, Karmarkar-Karp's merges cost more than they gain over greedy.
KK_MAX_WORK = 1 << 17


def balanced_partition(costs: list[float], parts: int) -> list[list[int]]:
    """Item indices split into `parts` groups of near-equal total cost, deterministically.
    Karmarkar-Karp's largest differencing for k parts (as verl and slime balance sequence
    lengths): every item starts as a k-tuple of subsets (itself and k-1 empty ones); the two
    tuples with the largest spread are merged, heaviest subset of one with lightest of the other,
    until one is left. For very large inputs (the reference pass over a whole dataset) the
    longest-first greedy, which is near optimal when the items are many."""
    if parts <= 1:
        return [list(range(len(costs)))]
    if len(costs) * parts > KK_MAX_WORK:
        return greedy_partition(costs, parts)
    heap = []
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        subsets = [(costs[i], (i,))] + [(0.0, ())] * (parts - 1)
        heapq.heappush(heap, (-costs[i], i, subsets))
    while len(heap) > 1:
        _, key, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda s: (-s[0], s[1]))
        b = sorted(b, key=lambda s: (s[0], s[1]))
        merged = sorted(((x[0] + y[0], x[1] + y[1]) for x, y in zip(a, b)), key=lambda s: (-s[0], s[1]))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), key, merged))
    groups = [sorted(items) for _, items in heap[0][2]] if heap else [[] for _ in range(parts)]
    return sorted(groups, key=lambda g: (-sum(costs[i] for i in g), g))


def greedy_partition(costs: list[float], parts: int) -> list[list[int]]:
    """Longest-first greedy: each item (costliest first) to the currently lightest group."""
    loads = [(0.0, k) for k in range(parts)]
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, k = heapq.heappop(loads)
        groups[k].append(i)
        heapq.heappush(loads, (load + costs[i], k))
    return [sorted(g) for g in groups]


# ---------------------------------------------------------------------------------------------
# Rows as the schedule runs them
# ---------------------------------------------------------------------------------------------


def row_multiple(cfg) -> int:
    """What a row's length must be a multiple of: the TP group splits it under sequence
    parallelism, context parallelism splits each sequence into 2 x cp chunks, and Transformer
    Engine's FP8 GEMMs want the token dimension in multiples of 16."""
    par, need = cfg.parallel, 1
    if par.sequence_parallel and par.tp > 1:
        need = math.lcm(need, par.tp)
    if par.cp > 1:
        need = math.lcm(need, 2 * par.cp)
    if cfg.precision.fp8:
        need = math.lcm(need, 16)
    return need


def pack_share(pairs: list[TokenizedPair], cfg) -> list[PackedRow]:
    """A rank's pairs packed into rows sized to their content (at most train.seq_length)."""
    return pack_pairs(pairs, cfg.train.seq_length, cfg.train.micro_batch_pairs, row_multiple=row_multiple(cfg))


def schedule_rows(rows: list[PackedRow], cfg, count: int | None = None) -> list[PackedRow]:
    """A rank's rows as the pipeline schedule runs them, padded with empty rows (no loss, no
    routed token, one layout multiple of tokens) up to `count` when given, and then to a multiple
    of pp for the interleaved schedule. Without `count`, expert parallelism still needs as many
    rows on every rank (each micro-batch's token all-to-all spans data-parallel replicas): the
    most any rank has, agreed by an all-reduce."""
    par, size = cfg.parallel, row_multiple(cfg)
    if count is None and par.ep > 1:
        most = torch.tensor(float(len(rows)), device=platform.device())
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        count = int(most)
    interleave = par.pp if par.vpp > 1 else 1
    target = max(len(rows), count or 0)
    target = -(-target // interleave) * interleave
    rows = rows + [empty_row(size) for _ in range(target - len(rows))]
    if par.pp > 1 and rows:
        # Pipeline stages exchange activations of one fixed shape per schedule run: a rank's rows
        # share the length of its longest (every stage of a pipeline packs the same pairs, so
        # they agree without a collective).
        longest = max(r.tokens.numel() for r in rows)
        rows = [pad_row(r, longest) for r in rows]
    return rows


def pad_row(row: PackedRow, length: int) -> PackedRow:
    """`row` lengthened to `length` with padding (one trailing padding segment)."""
    extra = length - row.tokens.numel()
    if extra <= 0:
        return row
    bounds = row.cu_seqlens.tolist()
    if row.num_real_tokens < bounds[-1]:
        bounds[-1] = length  # the row already ends in a padding segment: extend it
    else:
        bounds.append(length)
    cu = torch.tensor(bounds, dtype=torch.int32)

    def grow(t: torch.Tensor, fill) -> torch.Tensor:
        return torch.cat([t, torch.full((extra,), fill, dtype=t.dtype)])

    return dataclasses.replace(
        row, tokens=grow(row.tokens, 0), labels=grow(row.labels, 0), loss_mask=grow(row.loss_mask, False),
        segment_ids=grow(row.segment_ids, -1), cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))


def empty_row(length: int) -> PackedRow:
    return PackedRow(
        tokens=torch.zeros(length, dtype=torch.long),
        labels=torch.zeros(length, dtype=torch.long),
        loss_mask=torch.zeros(length, dtype=torch.bool),
        segment_ids=torch.full((length,), -1, dtype=torch.long),
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32),
        max_seqlen=length,
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


def step_shares(state: RunState, step: int) -> list[list[TokenizedPair]]:
    """Global batch `step` divided among the data-parallel ranks by estimated cost (pure: every
    rank computes every rank's share, so no collective is needed to agree on row counts)."""
    cfg, lay = state.cfg, state.layout
    batch = global_batch_indices(step, len(state.pairs), cfg.train.global_batch_pairs, cfg.train.seed, cfg.data.shuffle)
    pairs = [state.pairs[i] for i in batch]
    coeff = attention_cost_coefficient(state.arch)
    groups = balanced_partition([pair_cost(p, coeff) for p in pairs], lay.dp_size)
    return [[pairs[i] for i in group] for group in groups]


def step_rows(state: RunState, step: int) -> list[PackedRow]:
    """This rank's rows of global batch `step`; every data-parallel rank gets as many."""
    packed = [pack_share(share, state.cfg) for share in step_shares(state, step)]
    return schedule_rows(packed[state.layout.dp_rank], state.cfg, count=max(len(r) for r in packed))
