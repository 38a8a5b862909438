"""Damaged and mixed checkpoints, driven table-style through `train`, `mcore-to-hf` and `verify`:
a resuming run falls back past a checkpoint whose content is damaged (zero-filled bytes at the
same size, found by the manifest's checksums; or a file that fails to load under a manifest older
than checksums) with one `warning:` line naming the file, and ends bit-identical to an
uninterrupted run; with nothing older it says it starts from step 0. A same-size shard copied in
from another conversion is refused by every command with one `error:` line naming the file. All
commands run in ONE worker process (tests/cli_worker.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_arch

TINY = str(ROOT / "configs" / "models" / "tiny_llama.yaml")
BASE = ["train.global_batch_pairs=4", "train.seq_length=128", "train.lr=1e-3", "train.warmup_steps=0",
        "train.schedule=constant", "train.seed=5", "output.tensorboard=false", "objective.lam=0.5"]


def largest_model_file(step_dir: Path) -> Path:
    return max((f for f in (step_dir / "model").glob("*.distcp")), key=lambda f: f.stat().st_size)


def zero_fill_middle(path: Path) -> None:
    """A crash-like hole: 4 KiB of zeros in the middle of the file, its size unchanged."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    n = min(4096, len(data) // 4)
    assert any(data[mid:mid + n]), "the region to damage is already zero"
    data[mid:mid + n] = bytes(n)
    path.write_bytes(bytes(data))


def drop_checksums(step_dir: Path) -> None:
    """The manifest as written before checksums existed: {"files": {name: size}}."""
    m = json.loads((step_dir / "manifest.json").read_text())
    (step_dir / "manifest.json").write_text(json.dumps({"files": m["files"]}))


def damage_runs(base: str) -> None:
    """(worker set-up) every damage the steps below resume or convert from."""
    b = Path(base)
    zero_fill_middle(largest_model_file(b / "cut" / "checkpoints" / "step_0000003"))
    zero_fill_middle(largest_model_file(b / "lonely" / "checkpoints" / "step_0000001"))
    legacy = b / "legacy" / "checkpoints"
    for step in legacy.glob("step_*"):
        drop_checksums(step)
    meta = legacy / "step_0000003" / "model" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)  # unreadable, and no checksum to tell
    own, other = largest_model_file(b / "conv_a"), largest_model_file(b / "conv_b")
    foreign = b / "conv_b" / "model" / own.name
    assert foreign.stat().st_size == own.stat().st_size and foreign.read_bytes() != own.read_bytes()
    shutil.copy(foreign, own)
    del other


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("bad_ckpt")
    tok = build_tiny_tokenizer(base / "tok", vocab_size=512)
    model = save_hf_model(tiny_arch("llama"), base / "llama", seed=3, tokenizer_dir=tok)
    other = save_hf_model(tiny_arch("llama"), base / "llama_b", seed=4, tokenizer_dir=tok)
    pairs = write_jsonl(marker_pairs(16, seed=1), base / "pairs.jsonl")
    huge = write_jsonl([{"id": "ok", "prompt": "hello"}, {"id": "huge", "prompt": "alpha beta " * (5 << 20)}],
                       base / "huge_prompt.jsonl")  # 55 MiB in one prompt
    long = write_jsonl([{"id": "long", "prompt": " ".join(str(k) for k in range(1500))}], base / "long_prompt.jsonl")

    def train(out, *extra, model_dir=model):
        return ["train", TINY, f"model.path={model_dir}", f"data.train={pairs}", *BASE, f"output.dir={base / out}",
                *extra]

    def copy_run(src, dst):
        return {"exec": f"import shutil; shutil.copytree('{base / src}', '{base / dst}')"}

    def sample(prompts):
        return ["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(base / "samples.jsonl")]

    steps = [
        {"name": "huge_prompt", "cli": sample(huge)},
        {"name": "long_prompt", "cli": sample(long)},
        {"exec": f"import sys; open('{base / 'engine_imported'}', 'w').write(str('vllm' in sys.modules))"},
        {"name": "straight", "cli": train("straight", "train.steps=4", "train.save_every=1")},
        {"name": "cut_first", "cli": train("cut", "train.steps=3", "train.save_every=1")},
        copy_run("cut", "legacy"),
        {"name": "lonely_first", "cli": train("lonely", "train.steps=1", "train.save_every=1")},
        {"name": "conv_a", "tool": ["hf-to-mcore", "--hf", str(model), "--out", str(base / "conv_a")]},
        {"name": "conv_b", "tool": ["hf-to-mcore", "--hf", str(other), "--out", str(base / "conv_b")]},
        {"exec": f"from tests.e2e.test_bad_inputs_checkpoints import damage_runs; damage_runs('{base}')"},
        {"name": "zero_filled_shard", "cli": train("cut", "train.steps=4", "train.save_every=1")},
        {"name": "legacy_unloadable", "cli": train("legacy", "train.steps=4", "train.save_every=1")},
        {"name": "nothing_older", "cli": train("lonely", "train.steps=2", "train.save_every=1")},
        {"name": "foreign_shard_train", "cli": train("from_mixed", "train.steps=1", model_dir=base / "conv_a")},
        {"name": "foreign_shard_export", "tool": ["mcore-to-hf", "--ckpt", str(base / "conv_a"),
                                                  "--out", str(base / "export")]},
        {"name": "foreign_shard_verify", "tool": ["verify", "--hf", str(model), "--ckpt", str(base / "conv_a")]},
    ]
    spec, results = base / "steps.json", base / "results.json"
    spec.write_text(json.dumps(steps))
    subprocess.run([sys.executable, "-m", "tests.cli_worker", str(spec), str(results)], cwd=ROOT, check=True,
                   timeout=900)
    out = json.loads(results.read_text())
    out["_base"] = str(base)
    return out


# name, exit code, the one warning/error line must contain (the damaged file's name is checked
# separately), text that must not appear
CASES = [
    ("zero_filled_shard", 0, ["warning: checkpoint", "step_0000003 does not load", "content checksum",
                              "falling back to step_0000002"], ["starting from step 0"]),
    ("legacy_unloadable", 0, ["warning: checkpoint", "step_0000003 does not load", "cannot load the model weights",
                              "falling back to step_0000002"], ["starting from step 0"]),
    ("nothing_older", 0, ["warning: checkpoint", "step_0000001 does not load", "content checksum",
                          "no older complete checkpoint is left: starting from step 0"], ["falling back"]),
    ("foreign_shard_train", 2, ["error: ", "content checksum", "copied in from another checkpoint"], []),
    ("foreign_shard_export", 2, ["error: ", "content checksum", "copied in from another checkpoint"], []),
    ("foreign_shard_verify", 2, ["error: ", "content checksum", "copied in from another checkpoint"], []),
    ("huge_prompt", 2, ["error: prompt 'huge' has 57671680 characters", "max_model_len is 1024"], []),
    ("long_prompt", 2, ["error: prompt 'long' has", "tokens; the engine's max_model_len is 1024"], []),
]


def the_line(result: dict, prefix: str) -> str:
    text = result["out"] + result["err"]
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("name,code,fragments,absent", CASES, ids=[c[0] for c in CASES])
def test_damaged_checkpoint_cases(runs, name, code, fragments, absent):
    base = Path(runs["_base"])
    r = runs[name]
    assert r["code"] == code, (name, r["err"][-3000:])
    line = the_line(r, "warning: checkpoint" if code == 0 else "error: ")
    for fragment in fragments:
        assert fragment in line, line
    for fragment in absent:
        assert fragment not in r["out"] + r["err"], line
    if name.endswith("_prompt"):  # refused while the prompts were read: no engine, no output
        assert (base / "engine_imported").read_text() == "False" and not (base / "samples.jsonl").exists()
    elif name.startswith("foreign_shard"):
        assert largest_model_file(base / "conv_a").name in line, line  # the file is named
        assert not (base / "export").exists() and not list(base.glob(".export*")), "export half-written"
    elif name != "legacy_unloadable":
        damaged = "cut" if name == "zero_filled_shard" else "lonely"
        step = "step_0000003" if damaged == "cut" else "step_0000001"
        assert str(largest_model_file(base / damaged / "checkpoints" / step)) in line, line


def metrics(run: Path) -> list[dict]:
    """The logged values, wall-clock timings left out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("per_s"))} for r in rows]


def weights(step_dir: Path) -> dict:
    from aipo_mp.convert.tensor_io import DistCheckpointReader

    reader = DistCheckpointReader(step_dir / "model")
    return {k: reader.read(k, (0,) * len(reader.global_shape(k)), reader.global_shape(k)) for k in reader.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero_filled_shard", "legacy_unloadable"])
def test_fallback_resume_is_bit_identical_to_an_uninterrupted_run(runs, name):
    """Resumed from step 2 past the damaged step 3: steps 3-4 and the final weights equal the
    straight run's exactly. The compared quantities move: the loss changes from step to step
    (objective.lam=0.5 makes step 1 differ from ln 2), and the weights differ from step 3's."""
    base = Path(runs["_base"])
    assert runs["straight"]["code"] == 0, runs["straight"]["err"][-3000:]
    assert "resuming from" in runs[name]["out"] and "step_0000002 (step 2)" in runs[name]["out"]
    run = base / ("cut" if name == "zero_filled_shard" else "legacy")
    got, want = metrics(run), metrics(base / "straight")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert got == want
    assert len({m["loss"] for m in want}) == 4

    a, b = (weights(r / "checkpoints" / "step_0000004") for r in (run, base / "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    step3 = weights(base / "straight" / "checkpoints" / "step_0000003")
    assert any(not torch.equal(b[k], step3[k]) for k in b)


@pytest.mark.slow
def test_nothing_older_starts_from_step_0_like_a_fresh_run(runs):
    base = Path(runs["_base"])
    got = metrics(base / "lonely")
    assert [m["step"] for m in got] == [1, 2]
    assert got == metrics(base / "straight")[:2]


@pytest.mark.slow
def test_manifests_record_a_checksum_for_every_file(runs):
    base = Path(runs["_base"])
    for d in (base / "straight" / "checkpoints" / "step_0000004", base / "conv_b"):
        m = json.loads((d / "manifest.json").read_text())
        files = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file() and f.name != "manifest.json")
        assert sorted(m["files"]) == files and sorted(m["crc32"]) == files
        assert all(m["files"][f] == (d / f).stat().st_size for f in files)
