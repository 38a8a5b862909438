"""Memory bounded by the length settings on hostile data: over-long text is cut by characters
before tokenizing, and the cut never changes a token that survives truncation (compared with
tokenizing the whole text), nor which pairs are kept."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from aipo_mp.testing.tiny import build_tiny_tokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "t", 512)))


def words(rng: random.Random, n: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "x", "yy", "zzz", "the", "of", "42", "!", "ünï", "\n"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def hostile_records(rng: random.Random) -> list[dict]:
    long_a, long_b = words(rng, 3000), words(rng, 3000)
    return [
        {"prompt": long_a, "chosen": "yes " + words(rng, 5), "rejected": "no " + words(rng, 5)},  # prompt tail
        {"prompt": [{"role": "system", "content": long_a}, {"role": "user", "content": words(rng, 2000)}],
         "chosen": "yes", "rejected": "no"},  # chat prompt: tail over several messages
        {"prompt": "q", "chosen": "a" + long_a, "rejected": "b" + long_b},  # responses differ early
        {"prompt": "q", "chosen": long_a + " yes", "rejected": long_a + " no"},  # differ only past truncation
        {"prompt": "q", "chosen": "y" * 20000, "rejected": "n" + "y" * 20000},  # one unbroken word each
        {"prompt": "short", "chosen": "yes", "rejected": "no"},  # untouched
    ]


def cfg(seq_length: int, max_prompt_length: int = 8):
    return SimpleNamespace(train=SimpleNamespace(seq_length=seq_length),
                           data=SimpleNamespace(max_length=0, max_prompt_length=max_prompt_length))


@pytest.mark.parametrize("seq_length", [32, 64])
def test_char_cut_keeps_every_surviving_token(tokenizer, seq_length):
    from aipo_mp.data.pairs import DataStats, tokenize_pairs
    from aipo_mp.data.prepare import char_limit, cut_records, effective_max_length

    c = cfg(seq_length)
    records = hostile_records(random.Random(seq_length))
    limit = char_limit(c, tokenizer)
    assert limit < min(len(records[k]["chosen"]) for k in (2, 3, 4)) and limit < len(records[0]["prompt"])
    full_stats, cut_stats = DataStats(read=len(records)), DataStats(read=len(records))
    full = tokenize_pairs(records, tokenizer, effective_max_length(c), 8, full_stats)
    short = cut_records(records, limit, cut_stats)
    assert max(len(r["chosen"]) for r in short) <= limit
    got = tokenize_pairs(short, tokenizer, effective_max_length(c), 8, cut_stats)
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [(p.prompt, p.chosen, p.rejected) for p in full]
    assert len(full) == 5  # the pair that differs only past truncation is dropped either way
    for key in ("kept", "dropped_too_long", "dropped_identical", "truncated", "truncated_prompt",
                "truncated_response"):
        assert getattr(cut_stats, key) == getattr(full_stats, key), key
    assert records[0]["prompt"].startswith("alpha") or len(records[0]["prompt"]) > limit  # input left as read


def test_char_cut_with_a_tiny_limit_would_change_tokens(tokenizer):
    """The comparison above can fail: cutting below the bound changes the surviving tokens."""
    from aipo_mp.data.pairs import DataStats, tokenize_pairs
    from aipo_mp.data.prepare import cut_records

    records = hostile_records(random.Random(1))[:1]
    full = tokenize_pairs(records, tokenizer, 32, 16, DataStats())
    got = tokenize_pairs(cut_records(records, 8, DataStats()), tokenizer, 32, 16, DataStats())
    assert got[0].prompt != full[0].prompt
