"""Bad inputs, round two, driven table-style through the real commands (one worker process for all
of them, tests/cli_worker.py): damaged trusted JSON (config.json, aipo_checkpoint.json, the
safetensors index, run state) and weight shapes in every command; reward rules that exit, are
interrupted or overflow, and a stage that exits 0 without its output; an older run directory
without a run identity; negative step counts and clip values; a malicious pickle; the temporary
directory a killed conversion leaves. Each ends with one `error:` line (or exits 0 where that is
the documented outcome), no traceback, and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch

TINY = str(ROOT / "configs" / "models" / "tiny_llama.yaml")
RECIPE = str(ROOT / "configs" / "recipes" / "aipo_tiny.yaml")
TRAIN = ["train.steps=1", "train.global_batch_pairs=2", "train.seq_length=128", "output.tensorboard=false"]
# A stale temporary run directory of a conversion whose process is gone (see `dead_pid`).
STALE = "aipo_mp-convert.{pid}.round2test"

RULES = '''
import os, sys

def exits(prompt, response):
    sys.exit(0)

def interrupted(prompt, response):
    raise KeyboardInterrupt

def huge(prompt, response):
    return 1e308

def minus_huge(prompt, response):
    return -1e308

def hard_exit(prompt, response):  # ends the process with status 0 before any output is written
    os._exit(0)
'''

# A pickle that runs a command when unpickled without weights_only.
MALICIOUS = b"cos\nsystem\n(S'touch {marker}'\ntR."


def cut_file(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def build_corpus(base: Path) -> dict[str, Path]:
    """name -> a damaged copy of a good tiny model directory, a data file or a rule file."""
    from safetensors.torch import load_file, save_file

    from aipo_mp.demo import task as demo_task
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(base / "tok", vocab_size=512)
    good = save_hf_model(tiny_arch("llama"), base / "good", seed=3, tokenizer_dir=tok)
    corpus = {"good": good, "pairs": write_jsonl(marker_pairs(8, seed=1), base / "pairs.jsonl"),
              "other_pairs": write_jsonl(marker_pairs(8, seed=2), base / "other_pairs.jsonl"),
              "rules": base / "rules.py", "prompts": demo_task.write_prompts(base / "prompts.jsonl", n=3, seed=0)}
    corpus["rules"].write_text(RULES)

    def variant(name: str, damage) -> None:
        d = base / name
        shutil.copytree(good, d)
        damage(d)
        corpus[name] = d

    variant("config_list", lambda d: (d / "config.json").write_text("[]"))
    variant("config_null", lambda d: (d / "config.json").write_text("null"))
    variant("config_cut", lambda d: cut_file(d / "config.json"))

    def index_is_a_list(d: Path) -> None:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": ["x"]}))

    variant("index_list", index_is_a_list)

    def wrong_k_shape(d: Path) -> None:
        tensors = load_file(d / "model.safetensors")
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = tensors[name][: tensors[name].shape[0] // 2].clone()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    variant("wrong_k_shape", wrong_k_shape)

    def malicious_pickle(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(MALICIOUS.replace(b"{marker}", str(base / "PWNED").encode()))

    variant("malicious_pickle", malicious_pickle)
    # Samples for the reward command and the pre-filled runs (as the sample stage writes them).
    prompts = [json.loads(line) for line in corpus["prompts"].read_text().splitlines()]
    samples = [{"prompt_id": p["id"], "prompt": p["prompt"], "sample_index": k, "text": "answer " * (k + 1),
                "num_tokens": k + 2, "finish_reason": "stop"} for p in prompts for k in range(2)]
    corpus["samples"] = write_jsonl(samples, base / "samples.jsonl")
    for name in ("run_exits", "run_hard_exit"):
        run = base / name
        (run / "round_0").mkdir(parents=True)
        shutil.copy(corpus["samples"], run / "round_0" / "samples.jsonl")
        skip = {"skipped": "pre-filled by the test"}
        (run / "run_state.json").write_text(json.dumps({
            "rounds": {"0": {"baseline": skip, "export": skip, "synthesize": skip,
                             "sample": {"samples": str(run / "round_0" / "samples.jsonl")}}},
            "policies": {"0": str(good)}}))
        corpus[name] = run
    (base / "run_state_list").mkdir()
    (base / "run_state_list" / "run_state.json").write_text("[]")
    corpus["run_state_list"] = base / "run_state_list"
    return corpus


def damage_meta_code(mc: Path, base: Path) -> str:
    """Worker code (after hf-to-mcore wrote `mc`): three copies with a damaged aipo_checkpoint.json."""
    return f"""
import json, shutil
from pathlib import Path
mc, base = Path({str(mc)!r}), Path({str(base)!r})
for name in ("meta_cut", "meta_list", "meta_no_hf_config"):
    shutil.copytree(mc, base / name)
meta = json.loads((mc / "aipo_checkpoint.json").read_text())
text = (mc / "aipo_checkpoint.json").read_text()
(base / "meta_cut" / "aipo_checkpoint.json").write_text(text[: len(text) // 2])
(base / "meta_list" / "aipo_checkpoint.json").write_text(json.dumps([meta]))
del meta["hf_config"]
(base / "meta_no_hf_config" / "aipo_checkpoint.json").write_text(json.dumps(meta))
"""


def run_args(run: str, rule: str) -> list[str]:
    return ["run", RECIPE, "model.path={good}", "rounds.prompts={prompts}", f"output.dir={{{run}}}",
            f"reward.rule={{rules}}:{rule}", "rounds.num_rounds=1", "rounds.kl_estimate=false", "parallel.tp=1",
            "parallel.sequence_parallel=false", "cluster.nproc_per_node=1", "rounds.evaluate_final=false"]


def train(model: str, out: str = "{out}", data: str = "{pairs}", *extra: str) -> list[str]:
    return ["train", TINY, f"model.path={model}", f"data.train={data}", *TRAIN, f"output.dir={out}", *extra]


# (name, kind, argv template, expected exit code, fragment of the one stderr line). {X} is corpus
# path X, {out} a fresh output path. Cases run in this order (the old-run cases need "old run").
CASES = [
    # -- 1. damaged trusted JSON and weight shapes, in every command that reads them --------------
    ("train: config.json is a list", "cli", train("{config_list}"), 2, "holds a list, not a JSON object"),
    ("check: config.json is a list", "cli", ["check", TINY, "model.path={config_list}"], 2, "holds a list"),
    ("plan: config.json is a list", "cli", ["plan", "{config_list}", "--gpus", "4", "--gpu", "h100-80gb"], 2,
     "holds a list"),
    ("hf-to-mcore: config.json is a list", "tool", ["hf-to-mcore", "--hf", "{config_list}", "--out", "{out}"], 2,
     "holds a list"),
    ("inspect: config.json is a list", "tool", ["inspect", "{config_list}"], 2, "holds a list"),
    ("train: config.json is null", "cli", train("{config_null}"), 2, "holds null"),
    ("inspect: config.json is null", "tool", ["inspect", "{config_null}"], 2, "holds null"),
    ("check: config.json cut short", "cli", ["check", TINY, "model.path={config_cut}"], 2, "cut short"),
    ("hf-to-mcore: index weight_map is a list", "tool", ["hf-to-mcore", "--hf", "{index_list}", "--out", "{out}"], 2,
     "'weight_map' = a list"),
    ("train: k_proj has the wrong shape", "cli", train("{wrong_k_shape}"), 2, "but config.json implies"),
    ("inspect: k_proj has the wrong shape", "tool", ["inspect", "{wrong_k_shape}"], 2, "but config.json implies"),
    ("verify: k_proj has the wrong shape", "tool", ["verify", "--hf", "{wrong_k_shape}", "--ckpt", "{mcore}"], 2,
     "but config.json implies"),
    ("verify: aipo_checkpoint.json is a list", "tool", ["verify", "--hf", "{good}", "--ckpt", "{meta_list}"], 2,
     "holds a list"),
    ("train: aipo_checkpoint.json cut short", "cli", train("{meta_cut}"), 2, "aipo_checkpoint.json is cut short"),
    ("check: aipo_checkpoint.json cut short", "cli", ["check", TINY, "model.path={meta_cut}"], 2, "cut short"),
    ("train: aipo_checkpoint.json is a list", "cli", train("{meta_list}"), 2, "holds a list"),
    ("mcore-to-hf: aipo_checkpoint.json is a list", "tool", ["mcore-to-hf", "--ckpt", "{meta_list}", "--out", "{out}"],
     2, "holds a list"),
    ("mcore-to-hf: aipo_checkpoint.json lacks hf_config", "tool",
     ["mcore-to-hf", "--ckpt", "{meta_no_hf_config}", "--out", "{out}"], 2, "lacks the key 'hf_config'"),
    ("train: aipo_checkpoint.json lacks hf_config", "cli", train("{meta_no_hf_config}"), 2, "lacks the key 'hf_config'"),
    ("inspect: aipo_checkpoint.json lacks hf_config", "tool", ["inspect", "{meta_no_hf_config}"], 2,
     "lacks the key 'hf_config'"),
    ("run: run_state.json is a list", "cli", run_args("run_state_list", "huge"), 2, "run_state.json: the run state holds a list"),
    # -- 4. reward rules that exit or are interrupted; a stage without its output ---------------
    ("reward: rule calls sys.exit(0)", "cli", ["reward", "--samples", "{samples}", "--rule", "{rules}:exits",
                                               "--out", "{out}"], 2, "called sys.exit(0)"),
    ("reward: rule raises KeyboardInterrupt", "cli", ["reward", "--samples", "{samples}", "--rule",
                                                      "{rules}:interrupted", "--out", "{out}"], 2, "interrupted"),
    ("run: reward stage whose rule calls sys.exit(0)", "cli", run_args("run_exits", "exits"), 2,
     "stage round0-reward failed: reward rule"),
    ("run: reward stage exits 0 without its output", "cli", run_args("run_hard_exit", "hard_exit"), 2,
     "stage round0-reward exited 0 but did not write shard(s) [0]"),
    # -- 5. small cases -------------------------------------------------------------------------
    ("reward: rule returns 1e308", "cli", ["reward", "--samples", "{samples}", "--rule", "{rules}:huge",
                                           "--out", "{out}"], 2, "returned 1e+308"),
    ("reward: rule returns -1e308", "cli", ["reward", "--samples", "{samples}", "--rule", "{rules}:minus_huge",
                                            "--out", "{out}"], 2, "returned -1e+308"),
    ("train: train.steps=-3", "cli", train("{good}", "{out}", "{pairs}", "train.steps=-3"), 2, "train.steps=-3"),
    ("train: train.clip_grad=-1", "cli", train("{good}", "{out}", "{pairs}", "train.clip_grad=-1"), 2,
     "train.clip_grad=-1"),
    ("inspect --allow-pickle: a malicious pickle", "tool", ["inspect", "{malicious_pickle}", "--allow-pickle"], 2,
     "refused even with --allow-pickle"),
    ("hf-to-mcore --allow-pickle: a malicious pickle", "tool",
     ["hf-to-mcore", "--hf", "{malicious_pickle}", "--out", "{out}", "--allow-pickle"], 2,
     "refused even with --allow-pickle"),
    ("old run: other data", "cli", train("{good}", "{old_run}", "{other_pairs}"), 2,
     "recorded no run_identity.json"),
    ("old run: the same data resumes", "cli", train("{good}", "{old_run}", "{pairs}"), 0, None),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs_round2")
    corpus = build_corpus(base)
    mc, old_run = base / "mcore", base / "old_run"
    corpus |= {"mcore": mc, "old_run": old_run, "meta_cut": base / "meta_cut", "meta_list": base / "meta_list",
               "meta_no_hf_config": base / "meta_no_hf_config"}
    stale = Path("/tmp") / STALE.format(pid=dead_pid())
    stale.mkdir(exist_ok=True)
    steps = [{"name": "set-up: hf-to-mcore", "tool": ["hf-to-mcore", "--hf", str(corpus["good"]), "--out", str(mc)]},
             {"exec": damage_meta_code(mc, base)},
             {"name": "set-up: an older run", "cli": [a.format(**{k: str(v) for k, v in corpus.items()})
                                                      for a in train("{good}", "{old_run}", "{pairs}")]},
             {"exec": f"import os; os.unlink({str(old_run / 'run_identity.json')!r})"}]
    for i, (name, kind, argv, _, _) in enumerate(CASES):
        fill = {k: str(v) for k, v in corpus.items()} | {"out": str(base / f"out{i}")}
        steps.append({"name": name, kind: [a.format(**fill) for a in argv]})
    spec, out = base / "steps.json", base / "results.json"
    spec.write_text(json.dumps(steps))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tests.cli_worker", str(spec), str(out)], cwd=ROOT, env=env, check=True,
                   timeout=600)
    found = json.loads(out.read_text())
    found["_base"], found["_stale"] = str(base), str(stale)
    return found


def half_written(root: Path) -> list[Path]:
    """Temporary names our atomic writers use (.NAME.xxx.tmp, .NAME.xxx.partial)."""
    return [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".partial"))]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_round2(results, index):
    name, _, _, code, fragment = CASES[index]
    r = results[name]
    assert "Traceback" not in r["err"], (name, r["err"][-3000:])
    lines = [line for line in r["err"].splitlines() if line.strip()]
    if code == 0:
        assert r["code"] == 0 and not [line for line in lines if line.startswith("error:")], (name, r["err"][-3000:])
        return
    assert r["code"] == code and len(lines) == 1 and lines[0].startswith("error: "), (name, r["code"], r["err"][-3000:])
    assert fragment in lines[0], (name, lines[0])
    base = Path(results["_base"])
    out = base / f"out{index}"
    # Only the token cache (a complete file, keyed by the data) may precede a model error.
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert set(left) <= {"token_cache"}, f"{name}: {out} holds {left}"
    assert not half_written(base), half_written(base)


@pytest.mark.slow
def test_no_rule_ran_the_pickle_and_runs_record_no_reward(results):
    base = Path(results["_base"])
    assert not (base / "PWNED").exists(), "the malicious pickle ran its command"
    for run in ("run_exits", "run_hard_exit"):
        state = json.loads((base / run / "run_state.json").read_text())
        assert "reward" not in state["rounds"]["0"], state  # a failed stage is not recorded as done
        assert not (base / run / "round_0" / "scored.jsonl").exists()


@pytest.mark.slow
def test_old_run_resumed_only_on_its_own_data(results):
    """The refused rerun wrote nothing; the accepted one resumed the old checkpoint (no new step)
    and recorded the identity, so the directory is guarded from then on."""
    old = Path(results["_base"]) / "old_run"
    assert results["set-up: an older run"]["code"] == 0, results["set-up: an older run"]["err"][-2000:]
    assert (old / "run_identity.json").exists()
    steps = sorted(p.name for p in (old / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_0000001"], steps


@pytest.mark.slow
def test_a_conversion_sweeps_the_run_directory_a_killed_one_left(results):
    assert not Path(results["_stale"]).exists(), "the stale temporary directory of a dead conversion was left"
