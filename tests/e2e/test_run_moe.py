"""`aipo-mp run` on a tiny Qwen3-MoE (configs/recipes/aipo_tiny_moe.yaml: 4 experts, top-2, expert
parallelism 2 over the two training ranks): two rounds of vLLM sampling, rule reward, pairs,
training and the trainer's handoff end to end; the report carries the expert-load columns and
vLLM's log-probs on the handed-over policy equal transformers'."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_arch
from tests.e2e.test_run import check_vllm_logprobs_on_export, env

RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny_moe.yaml"


@pytest.mark.slow
def test_moe_rounds_end_to_end(tmp_path):
    from aipo_mp.demo import task as demo_task
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tokenizer", vocab_size=512)
    policy = save_hf_model(tiny_arch("qwen3_moe"), tmp_path / "policy", seed=0, tokenizer_dir=tok)
    prompts = demo_task.write_prompts(tmp_path / "prompts.jsonl", n=8, seed=0)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "aipo_mp.cli", "run", str(RECIPE), f"model.path={policy}", f"rounds.prompts={prompts}",
           f"output.dir={run_dir}", "rounds.num_rounds=2", "reward.rule=tests.rules:length_reward",
           "pairs.min_gap=0.0", "pairs.allow_truncated=true", "train.steps=2", "train.save_every=2",
           "train.global_batch_pairs=4", "sampling.n=3", "sampling.max_tokens=12", "rounds.kl_estimate=false"]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert [r["round"] for r in report] == [0, 1, 2]
    trained = [r for r in report if r["round"] < 2]  # the final round only samples
    for row in trained:
        assert row["expert_load_imbalance"] >= 1.0, row
        assert row["expert_dropped_share"] == 0.0 and row["router_aux_loss"] == 0.0, row
        assert 0.0 <= row["routing_changed_share"] <= 1.0, row
    assert "expert_load_imbalance" in (run_dir / "report" / "report.md").read_text()
    state = json.loads((run_dir / "run_state.json").read_text())
    for r in ("1", "2"):  # the EP2 trainer handed its policy to vLLM directly
        assert state["rounds"][r]["export"]["written_by"] == "trainer", state["rounds"][r]["export"]
    check_vllm_logprobs_on_export(run_dir / "round_2" / "policy_hf")
