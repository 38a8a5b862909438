"""Nothing silently wrong in a training run directory: its identity, its lock, resuming past a
damaged checkpoint, non-finite guards, the data report, the dataset formats users have, and a
full or read-only disk. All commands run in ONE worker process (tests/cli_worker.py: one import
of torch and megatron for all of them); each test below checks one part of the results."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_arch

TINY = str(ROOT / "configs" / "models" / "tiny_llama.yaml")
BASE = ["train.global_batch_pairs=4", "train.seq_length=128", "train.lr=1e-3", "train.warmup_steps=0",
        "train.schedule=constant", "train.seed=5", "output.tensorboard=false"]
FORMATS = ("trl_conversational_implicit", "ultrafeedback_style", "parquet", "save_to_disk", "jsonl_gz", "fields")
# The format runs: a non-zero NLL weight makes the step-1 loss depend on which answer is chosen
# (with lam = 0 it is ln 2 for any data at policy = reference), and a second step carries the
# first step's gradient, so a reader that swapped chosen and rejected gives other numbers.
FORMAT_RUN = ("train.steps=2", "objective.lam=0.5")
HOLD_LOCK = ("import sys, time; from aipo_mp.runtime.locks import Lock; Lock(sys.argv[1], 'holder test').acquire(); "
             "print('held', flush=True); time.sleep(120)")


def write_formats(records: list[dict], base: Path) -> dict[str, Path]:
    """The same pairs in every accepted format/schema."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    def convo(r, answer):
        return r["prompt"] + [{"role": "assistant", "content": answer}]

    paths = {}
    paths["trl_conversational_implicit"] = write_jsonl(
        [{"chosen": convo(r, r["chosen"]), "rejected": convo(r, r["rejected"])} for r in records], base / "trl.jsonl")
    paths["ultrafeedback_style"] = write_jsonl(
        [{"prompt": r["prompt"][-1]["content"], "chosen": convo(r, r["chosen"]), "rejected": convo(r, r["rejected"]),
          "score_chosen": 8.0, "score_rejected": 3.0} for r in records], base / "uf.jsonl")
    paths["parquet"] = base / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    paths["save_to_disk"] = base / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(paths["save_to_disk"]))
    paths["jsonl_gz"] = base / "pairs.jsonl.gz"
    with gzip.open(paths["jsonl_gz"], "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    paths["fields"] = write_jsonl([{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
                                   for r in records], base / "renamed.jsonl")
    return paths


def write_jsonl(records, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def nan_model(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def damage_checkpoints(run: Path) -> None:
    """latest names a step that is gone, and the newest step's largest model file is cut short."""
    ckpts = run / "checkpoints"
    (ckpts / "latest").write_text("step_0000009\n")
    biggest = max((f for f in (ckpts / "step_0000003" / "model").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def remount_read_only(disk: str, seconds: float = 30.0) -> None:
    """Remount the tmpfs read-only. The kernel refuses (EBUSY) while a file on it is open for
    writing: a checkpoint writer thread of the failed full-disk run may still be closing its file,
    so retry for a while; a file still open after that is reported by name."""
    import gc
    import os
    import time

    deadline = time.time() + seconds
    while True:
        gc.collect()
        done = subprocess.run(["mount", "-o", "remount,ro", disk], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if time.time() > deadline:
            fds = Path("/proc/self/fd")
            held = [os.readlink(fd) for fd in fds.iterdir() if os.path.exists(fd) and os.readlink(fd).startswith(disk)]
            raise RuntimeError(f"cannot remount {disk} read-only ({done.stderr.strip()}); files this worker holds "
                               f"open there: {held}")
        time.sleep(0.5)


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("run_dir")
    tok = build_tiny_tokenizer(base / "tok", vocab_size=512)
    model = save_hf_model(tiny_arch("llama"), base / "llama", seed=3, tokenizer_dir=tok)
    # chat prompts throughout: the conversational formats carry the prompt as messages
    records = [dict(r, prompt=[{"role": "user", "content": r["prompt"]}]) if isinstance(r["prompt"], str) else r
               for r in marker_pairs(24, seed=1)]
    pairs, other = write_jsonl(records, base / "pairs.jsonl"), write_jsonl(marker_pairs(24, seed=2), base / "other.jsonl")
    formats = write_formats(records, base)
    swapped = write_jsonl([dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in records], base / "swapped.jsonl")
    nan = nan_model(model, base / "nan_model")
    disk = base / "disk"
    mounted = mount_tmpfs(disk, "4m")

    def train(out, *extra, data=pairs, model_dir=model):
        return ["train", TINY, f"model.path={model_dir}", f"data.train={data}", *BASE, f"output.dir={base / out}", *extra]

    run1 = base / "run1"
    steps = [
        {"name": "first", "cli": train("run1", "train.steps=3", "train.save_every=1")},
        {"exec": f"import shutil; shutil.copy('{run1}/config.yaml', '{base}/config.before')"},
        {"name": "new_data", "cli": train("run1", "train.steps=3", data=other)},
        {"name": "new_objective", "cli": train("run1", "train.steps=3", "objective.beta=0.2")},
        {"name": "finished_same", "cli": train("run1", "train.steps=3", "train.save_every=1")},
        {"exec": f"import shutil; shutil.copytree('{run1}', '{base}/run2')\n"
                 f"from tests.dist.test_run_dir import damage_checkpoints; from pathlib import Path; "
                 f"damage_checkpoints(Path('{base}/run2'))"},
        {"name": "fallback", "cli": train("run2", "train.steps=4")},
        {"name": "fmt_reference", "cli": train("fmt_reference", *FORMAT_RUN)},
        {"name": "fmt_swapped", "cli": train("fmt_swapped", *FORMAT_RUN, data=swapped)},
        *[{"name": f"fmt_{f}", "cli": train(f"fmt_{f}", *FORMAT_RUN, data=formats[f],
                                            *(["data.fields.prompt=question", "data.fields.chosen=good",
                                               "data.fields.rejected=bad"] if f == "fields" else []))}
          for f in FORMATS],
        {"name": "nan_reference", "cli": train("nan1", "train.steps=2", model_dir=nan)},
        {"name": "nan_step", "cli": train("nan2", "train.steps=2", "objective.name=simpo", model_dir=nan)},
        {"name": "locked", "cli": train("locked", "train.steps=1")},
    ]
    if mounted:
        steps += [
            {"name": "disk_full", "cli": train("disk/run", "train.steps=1")},
            {"exec": f"import json; from pathlib import Path; json.dump([str(p) for p in Path('{disk}').rglob('*') "
                     f"if p.name.endswith(('.tmp', '.partial')) or p.name == 'manifest.json'], "
                     f"open('{base}/disk_left.json', 'w'))"},
            {"exec": f"from tests.dist.test_run_dir import remount_read_only; remount_read_only('{disk}')"},
            {"name": "read_only", "cli": train("disk/run_ro", "train.steps=1")},
        ]
    spec, results = base / "steps.json", base / "results.json"
    spec.write_text(json.dumps(steps))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(base / "locked")], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        subprocess.run([sys.executable, "-m", "tests.cli_worker", str(spec), str(results)], cwd=ROOT, check=True,
                       timeout=900)
    finally:
        holder.kill()
        holder.wait()
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)
    out = json.loads(results.read_text())
    out["_base"], out["_mounted"] = str(base), mounted
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def one_error_line(result: dict, *fragments: str) -> str:
    assert result["code"] == 2, result
    errors = [l for l in result["err"].splitlines() if l.strip() and not l.startswith("train:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), result["err"][-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.dist
def test_reused_output_dir_with_other_data_is_refused(runs):
    base = Path(runs["_base"])
    assert runs["first"]["code"] == 0, runs["first"]["err"][-3000:]
    one_error_line(runs["new_data"], "holds a run with different data (data.train)", "choose a new output.dir")
    one_error_line(runs["new_objective"], "different objective")
    # the refused commands left the run as it was: config.yaml, metrics, checkpoints
    assert (base / "run1" / "config.yaml").read_text() == (base / "config.before").read_text()
    assert [m["step"] for m in metrics(base / "run1")] == [1, 2, 3]
    assert runs["finished_same"]["code"] == 0 and "already complete" in runs["finished_same"]["out"]
    identity = json.loads((base / "run1" / "run_identity.json").read_text())
    assert {"data", "model", "objective", "seed"} <= set(identity)
    table = __import__("torch").load(base / "run1" / "reference_logps.pt", weights_only=True)
    assert set(table) == {"key", "table"} and table["table"].shape == (24, 2)  # keyed by what it came from


@pytest.mark.dist
def test_resume_falls_back_to_newest_complete_checkpoint(runs):
    base = Path(runs["_base"])
    r = runs["fallback"]
    assert r["code"] == 0, r["err"][-3000:]
    assert "names step_0000009, which does not exist" in r["out"]
    assert "step_0000003 is not usable" in r["out"] and "resuming from" in r["out"]
    assert "step_0000002 (step 2)" in r["out"]
    got, straight = metrics(base / "run2"), metrics(base / "run1")
    assert [m["step"] for m in got] == [1, 2, 3, 4]  # steps 1-2 kept, not wiped
    assert got[:2] == straight[:2]
    assert got[2]["loss"] == straight[2]["loss"]  # step 3 recomputed from step 2 = the original step 3


def loss_and_grad(run: Path) -> list[tuple[float, float]]:
    return [(m["loss"], m["grad_norm"]) for m in metrics(run)]


@pytest.mark.dist
def test_every_format_trains_like_our_jsonl(runs):
    """Two steps with lam = 0.5 on each format give our JSONL's losses and gradient norms. The
    comparison can see a swap: the same pairs with chosen and rejected exchanged give other
    numbers at both steps (so a reader that swapped them would fail here)."""
    import math

    base = Path(runs["_base"])
    for name in ("fmt_reference", "fmt_swapped"):
        assert runs[name]["code"] == 0, (name, runs[name]["err"][-3000:])
    reference, swapped = loss_and_grad(base / "fmt_reference"), loss_and_grad(base / "fmt_swapped")
    assert len(reference) == len(swapped) == 2
    assert abs(reference[0][0] - math.log(2)) > 1e-3, reference  # not the data-blind ln 2 of lam = 0
    for (loss, grad), (swapped_loss, swapped_grad) in zip(reference, swapped):
        assert abs(loss - swapped_loss) > 1e-3 and abs(grad - swapped_grad) > 1e-4, (reference, swapped)
    for f in FORMATS:
        r = runs[f"fmt_{f}"]
        assert r["code"] == 0, (f, r["err"][-3000:])
        got = loss_and_grad(base / f"fmt_{f}")
        assert len(got) == 2, (f, got)
        for (loss, grad), (want_loss, want_grad) in zip(got, reference):
            assert loss == pytest.approx(want_loss, abs=1e-6) and grad == pytest.approx(want_grad, rel=1e-5), \
                (f, got, reference)


@pytest.mark.dist
def test_data_report_is_printed_and_saved(runs):
    base = Path(runs["_base"])
    stats = json.loads((base / "run1" / "data_stats.json").read_text())
    assert stats["read"] == 24 and stats["kept"] + stats["dropped_too_long"] <= 24
    assert stats["truncated"] > 0 and stats["prompt_tokens_cut"] > 0  # seq_length 128 cuts the long prompts
    out = runs["first"]["out"]
    assert f"data: 24 rows read (jsonl), {stats['kept']} pairs kept" in out
    assert f"truncated {stats['truncated']} (prompt {stats['truncated_prompt']} pairs" in out
    assert "warning: " in out and "were truncated" in out  # above data.warn_truncated_share
    assert "note: data.max_prompt_length (default 512)" in out  # the default shrank to fit seq_length 128
    assert json.loads((base / "fmt_parquet" / "data_stats.json").read_text())["format"] == "parquet"


@pytest.mark.dist
def test_non_finite_weights_stop_with_one_line(runs):
    base = Path(runs["_base"])
    one_error_line(runs["nan_reference"], "reference log-probs of", "NaN or inf")
    one_error_line(runs["nan_step"], "step 1: the gradient norm is nan", "stopped without saving")
    for run in ("nan1", "nan2"):
        assert not (base / run / "checkpoints").exists()
        assert not (base / run / "metrics.jsonl").exists() or not (base / run / "metrics.jsonl").read_text()


@pytest.mark.dist
def test_locked_output_dir_is_refused(runs):
    one_error_line(runs["locked"], "is in use by `holder test`", "pid")
    assert not (Path(runs["_base"]) / "locked" / "checkpoints").exists()


@pytest.mark.dist
def test_full_and_read_only_disk_give_one_line(runs):
    if not runs["_mounted"]:
        pytest.skip("mounting a 4 MiB tmpfs needs root; the full-disk case is not exercised here")
    base = Path(runs["_base"])
    one_error_line(runs["disk_full"], "the disk is full")
    one_error_line(runs["read_only"], "read-only")
    left = json.loads((base / "disk_left.json").read_text())  # listed before the tmpfs was unmounted
    assert not left, left  # no half-written file, and no checkpoint claims to be complete


# ---------------------------------------------------------------------------------------------
# The lock itself (aipo_mp.runtime.locks), in this process and a child
# ---------------------------------------------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    from aipo_mp.runtime.locks import LockHeld, hold_lock, lock_path

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as info:
            with hold_lock(out, "second"):
                pass
        assert f"pid {holder.pid}" in str(info.value) and "holder test" in str(info.value)
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; its lock file stays behind
        holder.wait()
    assert lock_path(out).exists()  # stale: the kernel dropped the flock with the process
    with hold_lock(out, "after the holder died"):
        assert json.loads(lock_path(out).read_text())["what"] == "after the holder died"
    assert not lock_path(out).exists()  # released on exit, file removed
    with pytest.raises(RuntimeError):
        with hold_lock(out, "raises"):
            raise RuntimeError("boom")
    with hold_lock(out, "released after an exception"):
        pass
