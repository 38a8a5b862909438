"""`aipo-mp run` of the second tiny recipe end to end on CPU: a self-instruct stage each round, a
pairwise ranker (a tiny classifier built locally) instead of a reward, the compare stage, and the
report with raw vs length-controlled win rate and length per round. Every engine stage runs on two
engine tasks (sampling.replicas=2, reward.replicas=2): synthesize, the ranker, compare and the KL
stage give what one engine gives (checked here on one engine/comparator after the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_arch

RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny_selfinstruct.yaml"


@pytest.mark.slow
def test_run_with_synthesize_and_pairwise_ranker(tmp_path):
    from aipo_mp.demo import task as demo_task
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_classifier, build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tokenizer", vocab_size=512)
    policy = save_hf_model(tiny_arch("llama"), tmp_path / "policy", seed=0, tokenizer_dir=tok)
    ranker = build_tiny_classifier(tmp_path / "ranker", tok, seed=1)
    prompts = demo_task.write_prompts(tmp_path / "prompts.jsonl", n=8, seed=0)
    baseline = tmp_path / "baseline.jsonl"  # a fixed answer for every prompt but the last
    baseline.write_text("".join(json.dumps({"prompt_id": k, "text": "green silver orange"}) + "\n" for k in range(7)))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "aipo_mp.cli", "run", str(RECIPE), f"model.path={policy}",
           f"rounds.prompts={prompts}", f"reward.model={ranker}", f"output.dir={run_dir}", "rounds.num_rounds=1",
           "rounds.synthesize.total=6", "rounds.synthesize.max_batches=1", "rounds.synthesize.num_clusters=3",
           "rounds.synthesize.examples_per_prompt=3", "rounds.synthesize.generation_max_tokens=24",
           "rounds.synthesize.min_tokens=1", "pairs.min_rank_gap=1", "pairs.allow_truncated=true",
           "sampling.n=3", "sampling.max_tokens=10", "train.steps=2", "train.save_every=0",
           "train.global_batch_pairs=4", f"rounds.baseline_answers={baseline}",
           # two engine tasks per engine stage; training data parallel over the two slots
           "sampling.replicas=2", "reward.replicas=2", "rounds.kl_estimate=true",
           "parallel.tp=1", "parallel.sequence_parallel=false", "cluster.nproc_per_node=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    r0 = run_dir / "round_0"
    stats = json.loads((r0 / "synthesize_stats.json").read_text())
    assert stats["completions"] == 3 and stats["batches"] == 1  # ceil(6 / 2) generation prompts
    assert stats["parsed_instructions"] == stats["kept"] + stats["over_total"] + sum(stats["dropped"].values())
    round_prompts = [json.loads(l) for l in (r0 / "prompts.jsonl").read_text().splitlines()]
    new = [p for p in round_prompts if str(p["id"]).startswith("r0-n")]
    assert len(new) == stats["kept"] and len(round_prompts) == stats["kept"] + stats["seed_prompts_kept"]
    sampled = {json.dumps(s["prompt_id"]) for s in map(json.loads, (r0 / "samples.jsonl").read_text().splitlines())}
    assert sampled == {json.dumps(p["id"]) for p in round_prompts}

    scored = [json.loads(l) for l in (r0 / "scored.jsonl").read_text().splitlines()]
    assert all(s["ranker"] == "pairwise" for s in scored)
    by_prompt: dict = {}
    for s in scored:
        by_prompt.setdefault(json.dumps(s["prompt_id"]), []).append(s["rank"])
    assert all(sorted(r) == [1, 2, 3] for r in by_prompt.values())

    # The final policy (round 1) was sampled on the seed prompts and judged against round 0.
    judgments = [json.loads(l) for l in (run_dir / "round_1" / "judgments_vs_round0.jsonl").read_text().splitlines()]
    assert judgments and all(0 <= j["win"] <= 1 for j in judgments)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert [r["round"] for r in report] == [0, 1]
    assert report[1]["win_rate_vs_round0"] is not None and report[1]["lc_win_rate_vs_round0"] is not None
    assert report[1]["mean_length"] is not None and report[1]["length_p90"] is not None
    assert (r0 / "judgments_vs_baseline.jsonl").exists()
    vs_base = [json.loads(l) for l in (run_dir / "round_1" / "judgments_vs_baseline.jsonl").read_text().splitlines()]
    assert {j["prompt_id"] for j in vs_base} == set(range(7)) and len(vs_base) == 7 * 3  # 3 answers per prompt
    assert len({j["baseline_length"] for j in vs_base}) == 1
    assert report[1]["win_rate_vs_baseline"] is not None and report[1]["lc_win_rate_vs_baseline"] is not None
    md = (run_dir / "report" / "report.md").read_text()
    assert "Length-aware evaluation" in md and "length-controlled" in md
    assert "length-controlled" in done.stdout  # the report is printed at the end
    assert_engine_stages_equal_one_engine(run_dir, policy, ranker, prompts)


def assert_engine_stages_equal_one_engine(run_dir, policy, ranker, prompts):
    """The run's engine stages ran on two engine tasks each; one engine (one comparator) gives the same."""
    from aipo_mp.config import load_config
    from aipo_mp.data.records import read_prompts
    from aipo_mp.rounds.rankers import compare_answers, open_comparator, rank_samples
    from aipo_mp.rounds.report import kl_from_sums, kl_sums
    from aipo_mp.rounds.synthesize import synthesize, token_counter, vllm_generator

    cfg = load_config(str(run_dir / "config.yaml"), [])
    for r, stage, shards in ((0, "synthesize", "batch_000/of2"), (0, "reward", "of2"), (1, "compare/0", "of2")):
        markers = sorted((run_dir / f"round_{r}" / "shards" / stage / shards).glob("shard_*.json"))
        assert [json.loads(m.read_text())["rank"] for m in markers] == [0, 1], stage  # one shard per engine

    comparator, _ = open_comparator(cfg.reward)
    for r in (0, 1):
        rd = run_dir / f"round_{r}"
        got = [json.loads(l) for l in (rd / "scored.jsonl").read_text().splitlines()]
        want = rank_samples(rd / "samples.jsonl", comparator, cfg.reward.aggregate, "pairwise")
        assert [(g["prompt_id"], g["sample_index"], g["rank"]) for g in got] == \
            [(w["prompt_id"], w["sample_index"], w["rank"]) for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
    got = [json.loads(l) for l in (run_dir / "round_1" / "judgments_vs_round0.jsonl").read_text().splitlines()]
    want = compare_answers(run_dir / "round_1" / "samples.jsonl", run_dir / "round_0" / "samples.jsonl", comparator)
    assert [(g["prompt_id"], g["sample_index"]) for g in got] == [(w["prompt_id"], w["sample_index"]) for w in want]
    assert [g["win"] for g in got] == pytest.approx([w["win"] for w in want], abs=1e-6)

    # Round 0's self-instruct prompts on one engine: the same file.
    synth = cfg.rounds.synthesize
    synthesize(read_prompts(str(prompts)), vllm_generator(str(policy), synth, cfg.sampling, 0), token_counter(policy),
               synth, run_dir / "one_engine", 0)
    assert (run_dir / "one_engine" / "prompts.jsonl").read_text() == (run_dir / "round_0" / "prompts.jsonl").read_text()

    # KL(round 1 || round 0) over two engine tasks (every other sample each) vs one engine.
    kl = json.loads((run_dir / "kl.json").read_text())
    one = kl_from_sums(kl_sums(run_dir, [f"1={run_dir / 'round_1' / 'policy_hf'}"], str(policy)))
    assert kl["1"] is not None and kl["1"] == pytest.approx(one["1"], rel=1e-6, abs=1e-7)
