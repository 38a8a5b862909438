"""Engine layouts on the allocation (aipo_mp/rounds/placement.py) and the dry run's view of them:
engines that fit a node pack, engines wider than a node span whole nodes one task per node and
never share one; the 405B recipe's H100 layout and a judge over 8 nodes, as `aipo-mp run --dry-run
--json` prints them."""

from __future__ import annotations

import json
import os

import pytest

from aipo_mp.rounds.placement import engine_placement
from tests.conftest import ROOT

RECIPES = ROOT / "configs" / "recipes"


@pytest.mark.parametrize("replicas,tp,pp,dp,gpus_per_node", [(14, 8, 2, 1, 8), (3, 4, 1, 4, 8), (2, 2, 1, 1, 2),
                                                             (5, 2, 1, 1, 8), (3, 1, 4, 1, 2), (7, 3, 1, 1, 8)])
def test_engine_placement_covers_every_gpu_of_each_engine_once(replicas, tp, pp, dp, gpus_per_node):
    """Lay the tasks out as Slurm does (ntasks_per_node per node, in order): each engine gets
    exactly TP x PP x DP GPUs; a spanning engine's task k is engine k // nodes_per_engine on a node
    of its own; a fitting engine is one task and engines share a node only when they fit it."""
    p = engine_placement(replicas, tp, gpus_per_node, pp, dp)
    gpus = tp * pp * dp
    assert p.engines == replicas and p.ntasks == replicas * p.nodes_per_engine
    assert p.nodes_per_engine == max(1, gpus // gpus_per_node)
    node_of_task = [k // p.ntasks_per_node for k in range(p.ntasks)]
    assert max(node_of_task) + 1 == p.nodes
    engine_gpus = [0] * replicas
    engines_on_node: dict[int, set] = {}
    for k, node in enumerate(node_of_task):
        engine = k // p.nodes_per_engine
        engine_gpus[engine] += p.gpus_per_task
        engines_on_node.setdefault(node, set()).add(engine)
    assert engine_gpus == [gpus] * replicas
    for node, engines in engines_on_node.items():
        assert len(engines) * gpus <= gpus_per_node or len(engines) == 1, (node, engines)
        assert len(engines) * p.gpus_per_task <= gpus_per_node


def dry_run_json(argv: list[str], capsys, monkeypatch) -> dict:
    from aipo_mp.cli import main

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        main(["run", *argv, "--launcher", "slurm", "--dry-run", "--json"])
    out = capsys.readouterr()
    assert exit_code.value.code == 0, out.err
    return {s["name"]: s for s in json.loads(out.out)["stages"]}


def test_405b_samples_on_h100_with_engines_of_two_nodes(capsys, monkeypatch):
    """The issue's done-when: 28 H100 nodes, sampling (and the KL stage) as 14 engines of 2 nodes
    (28 tasks, one per node, node-rank 0 drives), training on 224 GPUs; the H200 recipe keeps one
    engine per node."""
    stages = dry_run_json([str(RECIPES / "aipo_llama3_1_405b.yaml"), "--nodes", "28", "--gpus-per-node", "8"],
                          capsys, monkeypatch)
    for kind in ("sample", "kl"):
        s = stages[kind]
        assert (s["engines"], s["nodes_per_engine"], s["ntasks"], s["nodes"], s["ntasks_per_node"]) == \
            (14, 2, 28, 28, 1), s
        assert s["engine_layout"]["tp"] * s["engine_layout"]["pp"] == 16 and s["driver_node_rank"] == 0
        assert "--ntasks=28" in s["argv"] and "--ntasks-per-node=1" in s["argv"]
    train = stages["train"]
    assert train["ntasks"] * train["gpus_per_task"] == 224 and train["nodes"] == 28
    h200 = dry_run_json([str(RECIPES / "aipo_llama3_1_405b_h200.yaml")], capsys, monkeypatch)["sample"]
    assert (h200["engines"], h200["nodes_per_engine"], h200["ntasks"], h200["gpus_per_task"]) == (28, 1, 28, 8)


def test_a_judge_on_eight_nodes_runs_eight_engines_for_reward_and_compare(capsys, monkeypatch):
    """reward.kind judge with 8 replicas of TP 8 on 8 nodes: the pairs scoring (reward) and the
    comparison against baseline answers each run 8 judge engines, one per node, not 1."""
    stages = dry_run_json([str(RECIPES / "aipo_llama3_70b.yaml"), "--nodes", "8", "--gpus-per-node", "8",
                           "reward.kind=judge", "reward.model=/checkpoints/judge", "reward.replicas=8",
                           "reward.tensor_parallel=8", "rounds.baseline_answers=/data/baseline.jsonl"],
                          capsys, monkeypatch)
    for kind in ("reward", "compare"):
        s = stages[kind]
        assert (s["engines"], s["nodes_per_engine"], s["ntasks"], s["nodes"], s["ntasks_per_node"]) == \
            (8, 1, 8, 8, 1), s


def test_the_dry_run_text_names_engines_nodes_and_the_driver(capsys, monkeypatch):
    from aipo_mp.cli import main

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        main(["run", str(RECIPES / "aipo_deepseek_v3.yaml"), "--launcher", "slurm", "--dry-run"])
    out = capsys.readouterr().out
    assert exit_code.value.code == 0
    line = next(line for line in out.splitlines() if "round0-sample:" in line)
    assert line.strip() == ("round0-sample: 16 task(s) on 16 node(s): 8 engine(s) x 2 nodes (TP 1 x DP 16, EP 16), "
                            "node-rank 0 drives, the other 1 headless")
