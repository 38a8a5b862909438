"""`aipo-mp run` end to end on a tiny random policy: rounds complete, the report and plots exist,
and killing the run during sampling, training and after the trainer's handoff, then rerunning, ends
with the same outputs as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch

RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from aipo_mp.demo import task as demo_task
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("run_assets")
    tok = build_tiny_tokenizer(base / "tokenizer", vocab_size=512)
    policy = save_hf_model(tiny_arch("llama"), base / "policy", seed=0, tokenizer_dir=tok)
    prompts = demo_task.write_prompts(base / "prompts.jsonl", n=12, seed=0)
    return {"policy": policy, "prompts": prompts}


def command(assets, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "aipo_mp.cli", "run", str(RECIPE), f"model.path={assets['policy']}",
            f"rounds.prompts={assets['prompts']}", f"output.dir={run_dir}", "rounds.num_rounds=2",
            "reward.rule=tests.rules:length_reward", "pairs.min_gap=0.0", "pairs.allow_truncated=true", "train.steps=4", "train.save_every=2",
            "train.global_batch_pairs=4", "sampling.n=3", "sampling.max_tokens=12", "rounds.kl_estimate=false"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def final_outputs(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((run_dir / "round_2" / "policy_hf").glob("*.safetensors")):
        weights.update(load_file(f))
    return {"scored": (run_dir / "round_2" / "scored.jsonl").read_text(), "weights": weights,
            "pairs": [(run_dir / f"round_{r}" / "pairs.jsonl").read_text() for r in range(2)]}


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.1)
    raise AssertionError(f"never reached {what} (exit {proc.poll()})")


@pytest.mark.slow
def test_run_kill_and_resume_matches_uninterrupted(assets, tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(command(assets, straight), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((straight / "report" / "report.json").read_text())
    assert [r["round"] for r in report] == [0, 1, 2]
    assert all(r["mean_reward"] is not None for r in report)
    for png in ("reward.png", "length.png", "agreement.png", "kl.png", "win_rate.png"):
        assert (straight / "report" / png).stat().st_size > 0
    check_vllm_logprobs_on_export(straight / "round_2" / "policy_hf")
    state = json.loads((straight / "run_state.json").read_text())
    for r in ("1", "2"):  # the trainer handed its policy over; no checkpoint was re-read
        assert state["rounds"][r]["export"] == {"hf_dir": str(straight / f"round_{r}" / "policy_hf"),
                                                "written_by": "trainer"}, state["rounds"][r]["export"]

    killed = tmp_path / "killed"
    logs = killed / "logs"
    stops = [
        (lambda: (logs / "round0-sample.log").exists(), "sampling"),
        # the first optimizer step is logged: training is under way (4 steps, saves at 2 and 4)
        (lambda: (killed / "round_0" / "train" / "metrics.jsonl").exists(), "training"),
        # the trainer has written round 1's HF directory (the handoff; no export stage runs)
        (lambda: (killed / "round_1" / "policy_hf").exists(), "the handoff"),
    ]
    for ready, what in stops:
        proc = subprocess.Popen(command(assets, killed), cwd=ROOT, env=env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, ready, what)
    rerun = subprocess.run(command(assets, killed), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    a, b = final_outputs(straight), final_outputs(killed)
    assert a["scored"] == b["scored"] and a["pairs"] == b["pairs"]
    assert a["weights"].keys() == b["weights"].keys()
    import torch

    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


VLLM_LOGPROBS = """
import json, sys
from aipo_mp.rounds.engines import logprobs_of
print("RESULT" + json.dumps(logprobs_of(sys.argv[1], json.loads(sys.argv[2]))))
"""


def check_vllm_logprobs_on_export(hf_dir: Path) -> None:
    """vLLM's CPU build loads a directory exported by checkpoint_tools (from the trainer's
    Megatron checkpoint) and its teacher-forced log-probs equal transformers' to 1e-4 (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokens = [[1, 5, 77, 300, 12, 9, 401, 2], [1, 42, 43, 44, 45]]
    out = subprocess.run([sys.executable, "-c", VLLM_LOGPROBS, str(hf_dir), json.dumps(tokens)], cwd=ROOT, env=env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.split("RESULT", 1)[1])
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for ids, lp in zip(tokens, got):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert (torch.tensor(lp) - want).abs().max() <= 1e-4, (lp, want)


BAD = [
    ("empty prompts", lambda t: ["rounds.prompts=" + str(t / "empty.jsonl")], "contains no prompts"),
    ("malformed prompts", lambda t: ["rounds.prompts=" + str(t / "bad.jsonl")], "bad.jsonl:2"),
    ("raising rule", lambda t: ["reward.rule=tests.rules:raising_rule"], "broken rule"),
    ("nan rule", lambda t: ["reward.rule=tests.rules:nan_rule"], "nan"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides,message", BAD, ids=[b[0] for b in BAD])
def test_run_bad_inputs(assets, tmp_path, name, overrides, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi"}\n{"prompt": \n')
    run_dir = tmp_path / "run"
    proc = subprocess.run(command(assets, run_dir) + overrides(tmp_path), cwd=ROOT, env=env(), capture_output=True,
                          text=True)
    err = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert err and message.lower() in err[-1].lower(), proc.stderr[-2000:]
    assert not (run_dir / "round_0" / "train").exists()
