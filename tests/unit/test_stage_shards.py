"""Engine stages placed over the allocation, without vLLM: the shard plan of whole prompts and the
merge back into input order; the ranker (reward) and compare stages of `aipo-mp run` driven by
the real RoundRunner over 1, 2 and 3 engine tasks (a tiny pairwise classifier, transformers)
give one engine's scores, ranks and judgments; a requeue redoes only the unfinished shard. The
tasks run in this process one after another (the stage commands themselves, through
`aipo_mp.cli.main`), each with the rank environment a launcher gives it."""

from __future__ import annotations

import json

import pytest

from aipo_mp.rounds.launchers import StageResult
from aipo_mp.rounds.shards import ShardDir, prompt_shards, restore_order


def test_prompt_shards_hold_whole_prompts_and_merge_back_in_input_order():
    ids = ["p2", "p0", "p2", 1, "p0", "p9", 1, "p2", "1"]  # interleaved; 1 and "1" are different prompts
    for engines in (1, 2, 3, 4, 10):
        order, bounds = prompt_shards(ids, engines)
        assert sorted(order) == list(range(len(ids)))
        assert len(bounds) == min(engines, 5) and bounds[0][0] == 0 and bounds[-1][1] == len(ids)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous
        owner = {}
        for k, (start, end) in enumerate(bounds):
            assert end > start
            for pos in order[start:end]:  # every record of a prompt in one shard
                assert owner.setdefault(json.dumps(ids[pos]), k) == k
        records = [{"i": k} for k in range(len(ids))]
        merged = [records[k] for k in order]  # what the shards hold, concatenated
        assert restore_order(merged, order) == records
    assert prompt_shards([], 3) == ([], [(0, 0)])
    with pytest.raises(ValueError):
        restore_order([{}], [0, 1])


class InProcessLauncher:
    """Runs a stage's tasks one after another in this process, each with RANK/WORLD_SIZE as the
    local launcher sets them (LOCAL_WORLD_SIZE 1: no task pins this process to a core subset)."""

    stop_requested = False

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.started: list[tuple[str, int]] = []

    def run(self, name, argv, placement, log_path=None, time_limit_min=None) -> StageResult:
        from aipo_mp.cli import main

        assert argv[0] == "aipo_mp.cli"
        for rank in range(placement.ntasks):
            for key, value in {"RANK": rank, "WORLD_SIZE": placement.ntasks, "LOCAL_RANK": 0,
                               "LOCAL_WORLD_SIZE": 1, "VLLM_PORT": 29999, "OMP_NUM_THREADS": 1}.items():
                self.monkeypatch.setenv(key, str(value))
            self.monkeypatch.delenv("SLURM_STEP_ID", raising=False)
            with pytest.raises(SystemExit) as done:
                main(argv[1:])
            assert done.value.code == 0
            self.started.append((name, rank))
        return StageResult(0, False)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from aipo_mp.testing.tiny import build_tiny_classifier, build_tiny_tokenizer

    base = tmp_path_factory.mktemp("pairwise")
    return build_tiny_classifier(base / "ranker", build_tiny_tokenizer(base / "tokenizer"), seed=3)


def write_samples(path, prompts: int, per_prompt: int, seed: int) -> list[dict]:
    import random

    words = "good bad fine red blue green tall short quick slow".split()
    rng = random.Random(seed)
    records = [{"prompt_id": p, "prompt": f"Question {p}?", "sample_index": s, "num_tokens": 3 + s,
                "text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))}
               for s in range(per_prompt) for p in range(prompts)]  # interleaved: not grouped by prompt
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def runner_for(tmp_path, classifier, engines: int, monkeypatch, name: str):
    from aipo_mp.config import config_from_dict, dump_config
    from aipo_mp.rounds.run import RoundRunner

    cfg = config_from_dict({"model": {"path": "x"}, "output": {"dir": str(tmp_path / name)},
                            "reward": {"kind": "pairwise", "model": str(classifier), "replicas": engines},
                            "cluster": {"nproc_per_node": 4}})
    (tmp_path / name).mkdir()
    dump_config(cfg, tmp_path / name / "config.yaml")
    launcher = InProcessLauncher(monkeypatch)
    return RoundRunner(cfg, tmp_path / name / "config.yaml", launcher, world_size=4), launcher


def test_ranker_and_compare_stages_over_engines_equal_one_engine(tmp_path, classifier, monkeypatch):
    from aipo_mp.config import RewardConfig
    from aipo_mp.rounds.rankers import compare_answers, open_comparator, rank_samples

    samples = write_samples(tmp_path / "samples.jsonl", prompts=5, per_prompt=3, seed=1)
    round0 = write_samples(tmp_path / "round0.jsonl", prompts=5, per_prompt=3, seed=2)
    comparator, _ = open_comparator(RewardConfig(kind="pairwise", model=str(classifier)))
    want = rank_samples(samples, comparator, "bradley_terry", "pairwise")
    want_judged = compare_answers(samples, round0, comparator, "pairwise")

    for engines in (1, 2, 3):
        runner, launcher = runner_for(tmp_path, classifier, engines, monkeypatch, f"e{engines}")
        rd = runner.round_dir(1)
        (rd / "samples.jsonl").write_text((tmp_path / "samples.jsonl").read_text())
        (runner.round_dir(0) / "samples.jsonl").write_text((tmp_path / "round0.jsonl").read_text())
        runner.reward(1)
        got = [json.loads(line) for line in (rd / "scored.jsonl").read_text().splitlines()]
        assert [(g["prompt_id"], g["sample_index"], g["text"]) for g in got] == \
            [(w["prompt_id"], w["sample_index"], w["text"]) for w in want]  # input order
        assert [g["rank"] for g in got] == [w["rank"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
        markers = ShardDir(rd / "shards" / "reward", engines).markers()
        assert sorted(m["rank"] for m in markers) == list(range(engines))  # each engine did its shard
        assert launcher.started == [("round1-reward", k) for k in range(engines)]

        runner.compare(1)
        judged = [json.loads(line) for line in (rd / "judgments_vs_round0.jsonl").read_text().splitlines()]
        assert [(j["prompt_id"], j["sample_index"]) for j in judged] == \
            [(w["prompt_id"], w["sample_index"]) for w in want_judged]
        assert [j["win"] for j in judged] == pytest.approx([w["win"] for w in want_judged], abs=1e-6)

    # A requeue after engine 1's shard was lost: only that shard is redone, the output is unchanged.
    shards = ShardDir(rd / "shards" / "reward", 3)
    before = {k: shards.marker(k).read_text() for k in range(3)}
    shards.marker(1).unlink()
    scored = (rd / "scored.jsonl").read_text()
    (rd / "scored.jsonl").unlink()
    launcher.started.clear()
    runner.reward(1)
    assert (rd / "scored.jsonl").read_text() == scored
    assert [shards.marker(k).read_text() == before[k] for k in range(3)] == [True, False, True]
    assert json.loads((shards.path / "todo.json").read_text()) == [1]
