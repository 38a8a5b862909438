"""Work per data-parallel rank: the global batch split by estimated cost (Karmarkar-Karp), rows
sized to their content, the same number of rows on every rank, and all of it a pure function of
the step (training/batches.py)."""

from __future__ import annotations

import types

import pytest

from aipo_mp.config import ModelArch, config_from_dict
from aipo_mp.data.pairs import TokenizedPair, pack_pairs, packed_utilization, synthetic_chat_pairs
from aipo_mp.training import batches
from aipo_mp.training.batches import (
    attention_cost_coefficient,
    balanced_partition,
    pad_row,
    pair_cost,
    schedule_rows,
    step_rows,
    step_shares,
)

ARCH = ModelArch(family="llama", hidden_size=512, intermediate_size=1408, num_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, head_dim=64, vocab_size=4096)


def skewed_pairs(n: int, seed: int = 3) -> list[TokenizedPair]:
    """Chat-like lengths plus a few pairs ten times longer than the rest."""
    pairs = synthetic_chat_pairs(n, seed)
    for p in pairs[:: max(1, n // 6)]:
        p.chosen = p.chosen * 6
    return pairs


def spread(costs: list[float], groups: list[list[int]]) -> float:
    loads = [sum(costs[i] for i in g) for g in groups]
    return max(loads) / min(loads)


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_partition_balances_skewed_costs_within_ten_percent(parts):
    pairs = skewed_pairs(16 * parts)
    costs = [pair_cost(p, attention_cost_coefficient(ARCH)) for p in pairs]
    groups = balanced_partition(costs, parts)
    assert sorted(i for g in groups for i in g) == list(range(len(pairs)))  # each pair exactly once
    assert spread(costs, groups) <= 1.10
    # The same data split by position (as before balancing) is far off: the check can fail.
    per = len(pairs) // parts
    by_position = [list(range(k * per, (k + 1) * per)) for k in range(parts)]
    assert spread(costs, by_position) > 1.10
    assert balanced_partition(costs, parts) == groups  # deterministic


def test_greedy_fallback_for_large_inputs_balances_too(monkeypatch):
    pairs = skewed_pairs(400)
    costs = [pair_cost(p, 0.0) for p in pairs]
    monkeypatch.setattr(batches, "KK_MAX_WORK", 10)
    groups = balanced_partition(costs, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(pairs)))
    assert spread(costs, groups) <= 1.02


def test_attention_term_grows_with_the_square_of_the_length():
    coeff = attention_cost_coefficient(ARCH)
    assert 0 < coeff < 1e-2
    short, long = TokenizedPair(0, [5] * 10, [6] * 10, [7] * 10), TokenizedPair(1, [5] * 100, [6] * 100, [7] * 100)
    assert pair_cost(long, coeff) / pair_cost(short, coeff) > 10.0  # more than linear
    assert pair_cost(long, 0.0) / pair_cost(short, 0.0) == pytest.approx(10.0)


def test_rows_sized_to_content_keep_utilization_high():
    pairs = synthetic_chat_pairs(10, seed=1)  # one rank's share of a step: the last row is part empty
    fixed = pack_pairs(pairs, 2560)
    sized = pack_pairs(pairs, 2560, row_multiple=8)
    assert [r.pair_indices.tolist() for r in sized] == [r.pair_indices.tolist() for r in fixed]
    assert all(r.tokens.numel() % 8 == 0 and r.tokens.numel() - r.num_real_tokens < 8 for r in sized)
    assert all(r.tokens.numel() == 2560 for r in fixed)
    assert packed_utilization(sized) >= 0.99 and packed_utilization(fixed) < 0.9
    for row in sized:  # the row's segments still cover it exactly
        assert int(row.cu_seqlens[-1]) == row.tokens.numel()


def train_cfg(dp_pairs: int = 32, pp: int = 1, vpp: int = 1, tp: int = 1):
    return config_from_dict({
        "model": {"path": "unused"}, "data": {"train": "unused"},
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp, "sequence_parallel": tp > 1},
        "train": {"global_batch_pairs": dp_pairs, "seq_length": 4096, "steps": 4},
    })


def fake_state(cfg, dp_rank: int, dp_size: int, pairs):
    layout = types.SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size)
    return types.SimpleNamespace(cfg=cfg, layout=layout, pairs=pairs, arch=ARCH)


def test_every_rank_gets_the_same_number_of_rows_and_the_split_is_a_function_of_the_step():
    pairs = skewed_pairs(200)
    cfg = train_cfg(dp_pairs=32, tp=2)
    dp = 4
    for step in range(3):
        per_rank = [step_rows(fake_state(cfg, r, dp, pairs), step) for r in range(dp)]
        assert len({len(rows) for rows in per_rank}) == 1
        trained = sorted(int(i) for rows in per_rank for row in rows for i in row.pair_indices)
        assert trained == sorted(batches.global_batch_indices(step, len(pairs), 32, cfg.train.seed, cfg.data.shuffle))
        assert all(row.tokens.numel() % 2 == 0 for rows in per_rank for row in rows)  # divides over TP (SP)
    # A resumed run: the order cache is empty again, and the shares of step 2 come out the same.
    before = [[p.index for p in share] for share in step_shares(fake_state(cfg, 0, dp, pairs), 2)]
    batches._ORDER_CACHE.clear()
    assert [[p.index for p in share] for share in step_shares(fake_state(cfg, 1, dp, pairs), 2)] == before


def test_pipeline_rows_share_one_length_and_interleaving_keeps_its_multiple():
    pairs = skewed_pairs(64)
    rows = pack_pairs(pairs[:9], 4096, row_multiple=1)
    assert len({r.tokens.numel() for r in rows}) > 1
    cfg = train_cfg(pp=2, vpp=2)
    scheduled = schedule_rows(rows, cfg, count=len(rows) + 2)
    assert len(scheduled) % 2 == 0 and len(scheduled) >= len(rows) + 2
    longest = max(r.tokens.numel() for r in rows)
    assert {r.tokens.numel() for r in scheduled} == {longest}
    for before, after in zip(rows, scheduled):
        n = before.tokens.numel()
        assert after.tokens[:n].equal(before.tokens) and after.loss_mask[:n].equal(before.loss_mask)
        assert not after.loss_mask[n:].any() and (after.segment_ids[n:] == -1).all()
        assert int(after.cu_seqlens[-1]) == longest
    assert pad_row(rows[0], rows[0].tokens.numel()) is rows[0]
