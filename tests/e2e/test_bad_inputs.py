"""A corpus of malformed inputs, driven table-style through every command that reads them: each
must end with exactly one `error: ...` line naming the problem, exit code 2, no traceback, and
nothing written under the output name. All commands run in one worker process
(tests/cli_worker.py). Also: conversion workers die with a killed parent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch

TINY = str(ROOT / "configs" / "models" / "tiny_llama.yaml")
TRAIN = ["train.steps=1", "train.global_batch_pairs=2", "train.seq_length=128", "output.tensorboard=false"]


def cut_file(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def build_corpus(base: Path) -> dict[str, Path]:
    """name -> a damaged copy of a good tiny model directory (or data file)."""
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(base / "tok", vocab_size=512)
    good = save_hf_model(tiny_arch("llama"), base / "good", seed=3, tokenizer_dir=tok)
    big_tok = build_tiny_tokenizer(base / "big_tok", vocab_size=1024)
    corpus = {"good": good, "pairs": write_jsonl(marker_pairs(8, seed=1), base / "pairs.jsonl")}

    def variant(name: str, damage) -> None:
        d = base / name
        shutil.copytree(good, d)
        damage(d)
        corpus[name] = d

    variant("truncated_safetensors", lambda d: cut_file(d / "model.safetensors"))
    variant("not_safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"))
    variant("no_tokenizer", lambda d: [f.unlink() for f in d.iterdir() if f.name.startswith("tokenizer")])
    variant("config_not_json", lambda d: (d / "config.json").write_text("{ not json"))
    variant("no_config", lambda d: (d / "config.json").unlink())
    def index_to_missing_shard(d: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))

    variant("index_names_missing_shard", index_to_missing_shard)
    variant("tokenizer_bigger_than_vocab", lambda d: [shutil.copy(f, d / f.name) for f in big_tok.iterdir()
                                                      if f.is_file()])
    def pickled_only(d: Path) -> None:
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    variant("bin_only", pickled_only)
    corpus["parquet_cut"] = base / "pairs.parquet"
    corpus["parquet_cut"].write_bytes(b"PAR1" + b"\x00" * 64)
    return corpus


# (name, kind, argv template, expected fragment). {X} is corpus path X, {out} a fresh output path.
CASES = [
    ("train: truncated safetensors", "cli",
     ["train", TINY, "model.path={truncated_safetensors}", "data.train={pairs}", *TRAIN, "output.dir={out}"],
     "truncated"),
    ("train: not a safetensors file", "cli",
     ["train", TINY, "model.path={not_safetensors}", "data.train={pairs}", *TRAIN, "output.dir={out}"],
     "not a readable safetensors file"),
    ("train: missing tokenizer", "cli",
     ["train", TINY, "model.path={no_tokenizer}", "data.train={pairs}", *TRAIN, "output.dir={out}"],
     "has no tokenizer files"),
    ("train: tokenizer larger than the vocabulary", "cli",
     ["train", TINY, "model.path={tokenizer_bigger_than_vocab}", "data.train={pairs}", *TRAIN, "output.dir={out}"],
     "vocab_size"),
    ("train: config.json not JSON", "cli",
     ["train", TINY, "model.path={config_not_json}", "data.train={pairs}", *TRAIN, "output.dir={out}"],
     "config.json"),
    ("train: damaged parquet", "cli",
     ["train", TINY, "model.path={good}", "data.train={parquet_cut}", *TRAIN, "output.dir={out}"],
     "not a readable Parquet file"),
    ("check: missing config.json", "cli", ["check", TINY, "model.path={no_config}"], "config.json"),
    ("train: only pickled .bin weights", "cli",
     ["train", TINY, "model.path={bin_only}", "data.train={pairs}", *TRAIN, "output.dir={out}"],
     "convert them to safetensors"),
    ("report: missing run directory", "cli", ["report", "{out}"], "run directory not found"),
    ("inspect: truncated safetensors", "tool", ["inspect", "{truncated_safetensors}"], "truncated"),
    ("hf-to-mcore: truncated safetensors", "tool",
     ["hf-to-mcore", "--hf", "{truncated_safetensors}", "--out", "{out}"], "truncated"),
    ("hf-to-mcore: index names a missing shard", "tool",
     ["hf-to-mcore", "--hf", "{index_names_missing_shard}", "--out", "{out}"], "model-00002-of-00002.safetensors"),
    ("hf-to-mcore: missing config.json", "tool", ["hf-to-mcore", "--hf", "{no_config}", "--out", "{out}"],
     "config.json"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    corpus = build_corpus(base)
    steps = [{"name": "plan: an HF directory", "cli": ["plan", str(corpus["good"]), "--gpus", "4", "--gpu",
                                                        "h100-80gb", "--seq-length", "256"]}]
    for i, (name, kind, argv, _) in enumerate(CASES):
        fill = {k: str(v) for k, v in corpus.items()} | {"out": str(base / f"out{i}")}
        steps.append({"name": name, kind: [a.format(**fill) for a in argv]})
    spec, out = base / "steps.json", base / "results.json"
    spec.write_text(json.dumps(steps))
    subprocess.run([sys.executable, "-m", "tests.cli_worker", str(spec), str(out)], cwd=ROOT, check=True, timeout=600)
    found = json.loads(out.read_text())
    found["_base"] = str(base)
    return found


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(results, index):
    name, _, _, fragment = CASES[index]
    r = results[name]
    lines = [l for l in r["err"].splitlines() if l.strip()]
    assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, r["code"], r["err"][-3000:])
    assert fragment in lines[0], (name, lines[0])
    if ".bin" in name:
        assert "--allow-pickle" not in lines[0]  # aipo-mp train has no such flag: do not name it
    out = Path(results["_base"]) / f"out{index}"
    assert not (out / "checkpoints").exists() and not (out.exists() and any(out.glob("*.safetensors")))
    assert not list(Path(results["_base"]).glob(f".out{index}*.partial"))


def running(procs) -> list:
    """Processes still running (a zombie has exited: its reaper is init, not us)."""
    import psutil

    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.dist
def test_conversion_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of the parent of a 2-rank conversion: the workers (each in its own session) used to
    run on and publish the output. Now they get SIGTERM from the kernel, stop, and remove the
    partial output and the temporary run directory."""
    import glob

    import psutil

    from aipo_mp.testing.hf_build import save_hf_model

    hf = save_hf_model(tiny_arch("llama"), tmp_path / "hf", seed=3)
    out = tmp_path / "mcore"
    before = set(glob.glob("/tmp/aipo_mp-convert.*"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-m", "checkpoint_tools", "hf-to-mcore", "--hf", str(hf), "--out",
                               str(out), "--tp", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers, deadline = [], time.time() + 60
    while time.time() < deadline and len(workers) < 2:
        workers = psutil.Process(parent.pid).children()
        time.sleep(0.1)
    assert len(workers) == 2, "the conversion did not start its two workers"
    time.sleep(1.0)  # let them get into their work
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and running(workers):
        time.sleep(0.2)
    alive = running(workers)
    for p in alive:
        p.kill()
    assert not alive, f"workers {[p.pid for p in alive]} outlived their killed parent"
    assert not out.exists(), "a worker published the output after its parent was killed"
    assert set(glob.glob("/tmp/aipo_mp-convert.*")) - before == set()


def test_plan_accepts_an_hf_directory(results):
    r = results["plan: an HF directory"]
    assert r["code"] == 0, r["err"][-2000:]
    assert "tp" in r["out"] and "GiB" in r["out"], r["out"][-2000:]


def test_reward_rule_is_checked_before_any_stage_and_scores_agree_with_pairs():
    """`aipo-mp run` imports the rule and checks its signature up front; a rule returning a bool
    or a numeric string is refused by the reward stage, as the pairs stage refuses it."""
    from aipo_mp.errors import ConfigError
    from aipo_mp.rounds.rewards import check_rule, finite_score

    assert check_rule("tests.rules:no_such_rule") and "has no function" in check_rule("tests.rules:no_such_rule")[0]
    assert check_rule("tests.rules:length_reward") == []
    assert "cannot be called as" in check_rule("os.path:isfile")[0]  # isfile(path): one argument
    assert check_rule("no_such_module_xyz:f")[0].startswith("reward rule 'no_such_module_xyz:f': cannot import")
    for bad in (True, "0.5", None, float("nan")):
        with pytest.raises(ConfigError):
            finite_score(bad, {"prompt_id": 0, "sample_index": 0}, "rule", "fix it")
    assert finite_score(3, {"prompt_id": 0}, "rule", "fix it") == 3.0
