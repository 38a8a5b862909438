"""The report's length-aware evaluation (pure functions, no engine): the length-controlled win
rate on synthetic judgments, win judgments from scalar scores, the report rows and plots of a
hand-made run directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from aipo_mp.rounds.report import (
    judgments_from_scores,
    length_controlled_win_rate,
    make_figure,
    percentile,
    round_rows,
    sigmoid,
    write_report,
)


def synthetic_judgments(judge, n: int = 20000, seed: int = 0, length_shift: float = 40.0) -> list[dict]:
    """A policy whose answers are `length_shift` tokens longer than the baseline's on average
    (spread 30), and a hidden quality edge q ~ N(0.4, 1) over the baseline; `judge(delta_len, q)`
    gives the probability that the policy's answer wins, from which the verdict is drawn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = rng.randint(20, 200)
        delta = rng.gauss(length_shift, 30.0)
        quality = rng.gauss(0.4, 1.0)
        out.append({"win": 1.0 if rng.random() < judge(delta, quality) else 0.0,
                    "length": base + delta, "baseline_length": base})
    return out


def test_length_only_judge_raw_win_rate_high_length_controlled_near_half():
    import math

    # The judge prefers longer answers and nothing else (its preference saturates, as a
    # human's would: 40 tokens longer is nearly as good as 200 tokens longer).
    result = length_controlled_win_rate(synthetic_judgments(lambda d, q: sigmoid(3 * math.tanh(d / 40))))
    print(f"length-only judge: raw {result['win_rate']:.3f}, length-controlled {result['lc_win_rate']:.3f}")
    # measured: raw 0.825, length-controlled 0.511 (seeds 1-3: 0.491-0.498)
    assert result["win_rate"] > 0.75
    assert abs(result["lc_win_rate"] - 0.5) < 0.03
    assert result["length_coef"] > 1.0

    # A judge that always picks the longer answer (no noise at all) still gives a finite fit.
    strict = length_controlled_win_rate(synthetic_judgments(lambda d, q: 1.0 if d > 0 else 0.0))
    print(f"always-longer judge: raw {strict['win_rate']:.3f}, length-controlled {strict['lc_win_rate']:.3f}")
    assert strict["win_rate"] > 0.85 and abs(strict["lc_win_rate"] - 0.5) < 0.15


def test_quality_only_judge_raw_and_length_controlled_agree():
    # Same longer answers, but the judge looks only at quality: length does not explain wins.
    result = length_controlled_win_rate(synthetic_judgments(lambda d, q: sigmoid(2 * q)))
    print(f"quality-only judge: raw {result['win_rate']:.3f}, length-controlled {result['lc_win_rate']:.3f}")
    # measured: raw 0.621, length-controlled 0.628 (the length term extrapolates to zero
    # difference from answers that are nearly all longer, hence the 20000 judgments)
    assert result["win_rate"] > 0.6
    assert abs(result["lc_win_rate"] - result["win_rate"]) < 0.015
    assert abs(result["length_coef"]) < 0.2


def test_equal_lengths_and_soft_labels():
    judgments = [{"win": w, "length": 10, "baseline_length": 10} for w in (1.0, 0.5, 0.5, 0.0, 1.0)]
    result = length_controlled_win_rate(judgments)
    assert result["win_rate"] == pytest.approx(0.6)
    assert result["lc_win_rate"] == pytest.approx(0.6, abs=1e-6)  # no length spread: LC = raw
    all_wins = length_controlled_win_rate([{"win": 1.0, "length": 5 + k, "baseline_length": 5} for k in range(9)])
    assert all_wins["lc_win_rate"] > 0.99 and all_wins["win_rate"] == 1.0
    assert length_controlled_win_rate([]) is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        length_controlled_win_rate([{"win": 2.0, "length": 1, "baseline_length": 1}])


def test_judgments_from_scores_match_prompt_and_sample():
    base = [{"prompt_id": 1, "sample_index": 0, "score": 0.5, "num_tokens": 4},
            {"prompt_id": 1, "sample_index": 1, "score": 0.2, "num_tokens": 6},
            {"prompt_id": "x", "sample_index": 0, "score": 0.0, "num_tokens": 3}]
    cur = [{"prompt_id": 1, "sample_index": 0, "score": 0.9, "num_tokens": 9},
           {"prompt_id": 1, "sample_index": 1, "score": 0.2, "num_tokens": 2},
           {"prompt_id": "x", "sample_index": 0, "score": -1.0, "num_tokens": 3},
           {"prompt_id": 2, "sample_index": 0, "score": 5.0, "num_tokens": 3}]  # no baseline answer
    got = judgments_from_scores(cur, base)
    assert [(j["prompt_id"], j["win"], j["length"], j["baseline_length"]) for j in got] == [
        (1, 1.0, 9, 4), (1, 0.5, 2, 6), ("x", 0.0, 3, 3)]
    assert percentile([3, 1, 2, 4], 0.5) == 2.5 and percentile([], 0.5) is None


def write_round(run_dir: Path, r: int, rows: list[dict]) -> None:
    rd = run_dir / f"round_{r}"
    rd.mkdir(parents=True)
    (rd / "scored.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))


def test_report_of_a_run_that_only_grows_its_answers(tmp_path):
    """Round 1 answers are longer and the reward is length: raw win rate 1, and the report says
    the gain is length. Plots have integer round ticks, a 0.5 line, raw and LC on one plot."""
    import matplotlib.pyplot as plt

    rng = random.Random(1)
    rounds = []
    for r in range(3):
        rows = []
        for p in range(40):
            for k in range(2):
                n = rng.randint(5, 15) + 3 * r
                rows.append({"prompt_id": p, "sample_index": k, "score": n + rng.random(), "num_tokens": n})
        rounds.append(rows)
        write_round(tmp_path, r, rows)
    paths = write_report(tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["round"] for r in report] == [0, 1, 2]
    assert report[0]["win_rate_vs_round0"] is None
    assert report[2]["win_rate_vs_round0"] > 0.75 and report[2]["length_diff_vs_round0"] > 4
    assert report[1]["length_p10"] <= report[1]["length_p50"] <= report[1]["length_p90"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "lc_win_rate_vs_round0" in md and "much of the raw gain is longer answers" in md
    assert all(p.stat().st_size > 0 for p in paths)

    fig = make_figure("win_rate.png", report)
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [0, 1, 2]
    labels = [l.get_label() for l in ax.get_lines()]
    assert "raw vs round 0" in labels and "length-controlled vs round 0" in labels
    half = [l for l in ax.get_lines() if l.get_label().startswith("0.5")]
    assert half and set(half[0].get_ydata()) == {0.5}
    plt.close(fig)
    length_fig = make_figure("length.png", report)
    assert list(length_fig.axes[0].get_xticks()) == [0, 1, 2]
    plt.close(length_fig)

    # A fixed baseline answer file (one answer per prompt, scored by the reward): every round,
    # round 0 included, gets a win rate against it; every answer of a prompt meets the same one.
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "scored.jsonl").write_text("".join(
        json.dumps({"prompt_id": p, "sample_index": 0, "score": 12.0, "num_tokens": 12}) + "\n" for p in range(40)))
    write_report(tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all(r["win_rate_vs_baseline"] is not None for r in report)
    assert report[0]["win_rate_vs_baseline"] < report[2]["win_rate_vs_baseline"]
    assert "vs the baseline answers" in (tmp_path / "report" / "report.md").read_text()

    # Ranker scores (within-prompt ranks) are not compared across rounds without judgments.
    ranked = tmp_path / "ranked"
    for r in range(2):
        write_round(ranked, r, [{**x, "ranker": "pairwise"} for x in rounds[r]])
    report = {r["round"]: r for r in round_rows(ranked)}
    assert report[1]["win_rate_vs_round0"] is None and report[1]["win_rate_vs_previous"] is None
    (ranked / "round_1" / "judgments_vs_round0.jsonl").write_text(
        "".join(json.dumps({"win": 0.75, "length": 10, "baseline_length": 10}) + "\n" for _ in range(4)))
    write_report(ranked)
    row = json.loads((ranked / "report" / "report.json").read_text())[1]
    assert row["win_rate_vs_round0"] == pytest.approx(0.75) and row["lc_win_rate_vs_round0"] == pytest.approx(0.75)
