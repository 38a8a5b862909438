"""Vocab-parallel per-token log-probs and their gradients equal a single-process log_softmax gather
to 1e-6 (fp32) at TP=1, 2 and 4, in the padded [B, S] and packed [T] layouts."""

import json

import pytest

from tests.launch import run_ranks


@pytest.mark.dist
def test_vocab_parallel_logprobs_match_log_softmax(tmp_path):
    out = tmp_path / "lp.json"
    run_ranks(4, "tests.logprob_worker", [str(out)])
    results = json.loads(out.read_text())
    assert {r["tp"] for r in results} == {1, 2, 4} and len(results) == 6
    for r in results:
        assert r["token_diff"] <= 1e-6, r
        assert r["seq_diff"] <= 1e-5, r
        assert r["grad_diff"] <= 1e-6, r
        assert r["input_untouched"], r
