"""checkpoint_tools: HF <-> Megatron conversions are bit-exact (torch.equal on every tensor) at
TP=1 and TP=2 x PP=2, converted checkpoints give HF's logits (verify, also at a layout other than
the stored one), inspect reads both kinds, and every user mistake is one `error:` line, exit 2,
with no output directory (or partial sibling) left behind.

Single-rank conversions run in this process (`main(argv)`), which keeps the number of process
launches small: two 4-rank and two 2-rank launches, plus two single-process CLI runs."""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAMILIES, ROOT

TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def run_main(*argv) -> tuple[int, str, str]:
    """The CLI in this process (single-rank jobs run here); returns (exit code, stdout, stderr)."""
    from aipo_mp.convert.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(*argv, timeout: int = 300) -> tuple[int, str, str]:
    """The CLI as a user runs it (it starts its own worker processes for multi-rank jobs)."""
    p = subprocess.run([sys.executable, "-m", "checkpoint_tools", *map(str, argv)], cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def ok(result) -> str:
    rc, out, err = result
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def assert_user_error(result, needle: str, *must_not_exist: Path) -> str:
    rc, out, err = result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{err}"
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for p in must_not_exist:
        assert not p.exists(), f"{p} was left behind"
        assert not p.with_name(f".{p.name}.partial").exists(), f"partial output of {p} was left behind"
    return lines[0]


def max_diff(stdout: str) -> float:
    return float(stdout.split("max abs diff ")[1].split()[0])


def assert_same_weights(a: Path, b: Path, dtype=None) -> int:
    """Every tensor of HF dir `a` equals the one in `b` (same names, dtype, values)."""
    from aipo_mp.convert.hf_io import HFWeights

    wa, wb = HFWeights(a), HFWeights(b)
    assert sorted(wa.names()) == sorted(wb.names())
    for name in wa.names():
        ta, tb = wa.get(name), wb.get(name)
        if dtype is not None:
            ta = ta.to(dtype)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), f"{name} differs"
    return len(wa.names())


def rewrite_weights(src: Path, dst: Path, edit) -> Path:
    """Copy HF dir `src` to `dst` with its tensors passed through `edit(dict) -> dict`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file(edit(dict(load_file(f))), str(f), metadata={"format": "pt"})
    return dst


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    assert not any(info.values()), f"{hf_dir}: loading problems {info}"
    with torch.no_grad():
        return model.eval()(ids).logits


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt_tools")


@pytest.fixture(scope="module")
def tp1(tiny_hf_dirs, work) -> dict:
    """HF -> Megatron (TP=1) -> HF for each family, in this process."""
    out = {}
    for fam in FAMILIES:
        mc, back = work / f"mc_{fam}_tp1", work / f"hf_{fam}_back"
        ok(run_main("hf-to-mcore", "--hf", tiny_hf_dirs[fam], "--out", mc))
        # A small shard size, so the output really is several files with an index.
        ok(run_main("mcore-to-hf", "--ckpt", mc, "--out", back, "--max-shard-size", "300KB"))
        out[fam] = (mc, back)
    return out


# ---------------------------------------------------------------------------------------------
# single-rank conversions (in this process)
# ---------------------------------------------------------------------------------------------


def test_tp1_round_trip_is_bit_exact_and_loads_in_transformers(tiny_hf_dirs, tp1):
    for fam in FAMILIES:
        mc, back = tp1[fam]
        assert_same_weights(tiny_hf_dirs[fam], back)
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, "expected several shards"
        cfg = json.loads((back / "config.json").read_text())
        assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
        assert (back / "generation_config.json").exists() and (mc / "hf_extra" / "generation_config.json").exists()
        meta = json.loads((mc / "aipo_checkpoint.json").read_text())
        assert meta["format"] == "aipo_mp.megatron.v1" and meta["layout"] == {"tp": 1, "pp": 1, "vpp": 1}
        assert meta["family"] == fam and meta["dtype"] == "fp32"
    # The written directory is a working transformers model (gemma2: tied embeddings, no lm_head).
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_logits(tp1["gemma2"][1], ids), hf_logits(tiny_hf_dirs["gemma2"], ids))


def test_verify_and_inspect_after_tp1_conversion(tiny_hf_dirs, tp1):
    for fam in FAMILIES:
        out = ok(run_main("verify", "--hf", tiny_hf_dirs[fam], "--ckpt", tp1[fam][0]))
        assert max_diff(out) <= TOL, out
    mc, back = tp1["mistral"]
    hf_info = json.loads(ok(run_main("inspect", tiny_hf_dirs["mistral"], "--json")))
    mc_info = json.loads(ok(run_main("inspect", mc, "--json")))
    assert hf_info["kind"] == "hf" and mc_info["kind"] == "megatron"
    assert hf_info["family"] == mc_info["family"] == "mistral"
    assert hf_info["num_params"] == mc_info["num_params"] == mc_info["num_params_config"]
    assert hf_info["dtype"] == mc_info["dtype"] == "fp32"
    assert mc_info["layout"] == {"tp": 1, "pp": 1, "vpp": 1} and hf_info["layout"] is None
    assert mc_info["arch"]["head_dim"] == 48 and mc_info["bytes"] >= 4 * mc_info["num_params"]
    text = ok(run_main("inspect", mc))
    assert "layout:      tp=1 pp=1 vpp=1" in text and "parameters:" in text


def test_verify_fails_on_other_weights(tiny_hf_dirs, tp1, work):
    other = rewrite_weights(tiny_hf_dirs["llama"], work / "llama_other",
                            lambda t: {k: v * 1.01 if "mlp" in k else v for k, v in t.items()})
    rc, out, err = run_main("verify", "--hf", other, "--ckpt", tp1["llama"][0])
    assert rc == 1 and "FAILED" in out and max_diff(out) > TOL, (rc, out, err)


def test_bf16_and_pickled_sources(tiny_hf_dirs, work):
    """bf16 stays bit-exact both ways (and casts exactly to fp32); pickled .bin weights are refused
    without --allow-pickle and convert exactly with it."""
    src = rewrite_weights(tiny_hf_dirs["llama"], work / "llama_bf16",
                          lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))
    mc, back, back32 = work / "mc_bf16", work / "hf_bf16_back", work / "hf_bf16_as_fp32"
    ok(run_main("hf-to-mcore", "--hf", src, "--out", mc))
    assert json.loads(ok(run_main("inspect", mc, "--json")))["dtype"] == "bf16"
    ok(run_main("mcore-to-hf", "--ckpt", mc, "--out", back))
    assert_same_weights(src, back)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    ok(run_main("mcore-to-hf", "--ckpt", mc, "--out", back32, "--dtype", "fp32"))
    assert_same_weights(src, back32, dtype=torch.float32)
    assert max_diff(ok(run_main("verify", "--hf", src, "--ckpt", mc))) <= TOL

    pickled = work / "llama_bin"
    pickled.mkdir()
    shutil.copy(tiny_hf_dirs["llama"] / "config.json", pickled)
    from aipo_mp.convert.hf_io import HFWeights

    w = HFWeights(tiny_hf_dirs["llama"])
    torch.save({n: w.get(n) for n in w.names()}, pickled / "pytorch_model.bin")
    out = work / "mc_from_bin"
    assert_user_error(run_main("hf-to-mcore", "--hf", pickled, "--out", out), "--allow-pickle", out)
    ok(run_main("hf-to-mcore", "--hf", pickled, "--out", out, "--allow-pickle"))
    ok(run_main("mcore-to-hf", "--ckpt", out, "--out", work / "hf_from_bin"))
    assert_same_weights(tiny_hf_dirs["llama"], work / "hf_from_bin")


def test_row_map_agrees_with_the_mapping_functions():
    """The row blocks both converters copy by are the table's to_megatron + tp_slice, at every
    TP rank (TP=1 and 2), for every rule of every family (MoE: experts too)."""
    from aipo_mp.convert.common import expected_hf_shapes
    from aipo_mp.convert.row_map import row_blocks
    from aipo_mp.models import get_family
    from aipo_mp.models.build import to_megatron, tp_slice
    from aipo_mp.models.family import rule_indices
    from tests.conftest import MOE_MODELS, tiny_arch

    g = torch.Generator().manual_seed(0)
    checked = 0
    for fam in FAMILIES + MOE_MODELS:
        arch, family = tiny_arch(fam), get_family(fam)
        shapes = expected_hf_shapes(arch, family.hf_names(arch))
        shape = lambda n: shapes.get(n, (arch.hidden_size,))  # noqa: E731 - the norms
        for rule in family.rules(arch):
            if not rule_indices(rule, arch):
                continue  # a dense-layer rule of a model without dense layers (Mixtral)
            index = rule_indices(rule, arch)[-1]
            hf = {n: torch.randn(shape(n), generator=g) for n in rule.hf_at(index)}
            full = to_megatron(rule, [hf[n] for n in rule.hf_at(index)], arch)
            for size in (1, 2):
                for rank in range(size):
                    want = tp_slice(full, rule.split, rank, size)
                    got = torch.full_like(want, float("nan"))
                    for b in row_blocks(rule, index, arch, rank, size, shape):
                        src = hf[b.hf_name][b.src:b.src + b.n]
                        got[b.dst:b.dst + b.n] = src if b.cols is None else src[:, b.cols[0]:b.cols[1]]
                    assert torch.equal(got, want), (fam, rule.megatron, rank, size)
                    checked += 1
    assert checked > 30


# ---------------------------------------------------------------------------------------------
# user mistakes: one line, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(tiny_hf_dirs, work) -> dict:
    llama = tiny_hf_dirs["llama"]
    d = {}
    d["unsupported"] = work / "bad_arch"
    shutil.copytree(llama, d["unsupported"])
    cfg = json.loads((llama / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d["unsupported"] / "config.json").write_text(json.dumps(cfg))
    d["missing"] = rewrite_weights(llama, work / "bad_missing",
                                   lambda t: {k: v for k, v in t.items() if k != "model.layers.2.mlp.up_proj.weight"})
    d["unexpected"] = rewrite_weights(llama, work / "bad_unexpected",
                                      lambda t: {**t, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)})
    d["shape"] = rewrite_weights(llama, work / "bad_shape",
                                 lambda t: {**t, "model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 128)})
    return d


def test_user_mistakes_are_one_line_and_leave_nothing(tiny_hf_dirs, tp1, broken, work):
    llama, mc = tiny_hf_dirs["llama"], tp1["llama"][0]
    out = work / "never"
    cases = [
        (("hf-to-mcore", "--hf", broken["unsupported"], "--out", out),
         "unsupported architecture GPT2LMHeadModel; supported: DeepseekV3ForCausalLM, Gemma2ForCausalLM, GptOssForCausalLM, "
         "LlamaForCausalLM, "
         "MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"),
        (("hf-to-mcore", "--hf", broken["missing"], "--out", out), "missing tensors model.layers.2.mlp.up_proj.weight"),
        (("hf-to-mcore", "--hf", broken["unexpected"], "--out", out), "unexpected tensors model.layers.9.mlp.up_proj.weight"),
        (("hf-to-mcore", "--hf", broken["shape"], "--out", out),
         "tensor model.layers.1.self_attn.q_proj.weight has shape (64, 128) but config.json implies (128, 128)"),
        (("hf-to-mcore", "--hf", llama, "--out", out, "--tp", "3"), "--tp=3 does not divide the 4 attention heads"),
        (("hf-to-mcore", "--hf", llama, "--out", out, "--pp", "3"), "--pp=3 does not divide the 4 layers"),
        (("hf-to-mcore", "--hf", llama, "--out", out, "--pp", "2", "--vpp", "4"), "pp x vpp = 2 x 4 does not divide"),
        (("hf-to-mcore", "--hf", work / "nowhere", "--out", out), "HF directory not found"),
        (("hf-to-mcore", "--hf", llama), "the following arguments are required: --out"),
        (("mcore-to-hf", "--ckpt", llama, "--out", out), "is not an aipo_mp Megatron checkpoint"),
        (("mcore-to-hf", "--ckpt", mc, "--out", out, "--max-shard-size", "lots"), "--max-shard-size 'lots'"),
        (("verify", "--hf", tiny_hf_dirs["mistral"], "--ckpt", mc), "--hf and --ckpt are different models"),
        (("verify", "--hf", llama, "--ckpt", mc, "--tp", "4"), "--tp=4 does not divide the 2 query groups"),
        (("inspect", work / "nowhere"), "not a directory"),
    ]
    for argv, needle in cases:
        assert_user_error(run_main(*argv), needle, out)
    # An existing destination is refused (both directions) and left untouched; --overwrite replaces it.
    existing = work / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_user_error(run_main("hf-to-mcore", "--hf", llama, "--out", existing), "already exists; pass --overwrite")
    assert_user_error(run_main("mcore-to-hf", "--ckpt", mc, "--out", existing), "already exists; pass --overwrite")
    assert (existing / "keep.txt").read_text() == "mine"
    ok(run_main("hf-to-mcore", "--hf", llama, "--out", existing, "--overwrite"))
    assert not (existing / "keep.txt").exists() and (existing / "aipo_checkpoint.json").exists()


def test_cli_process_prints_one_line_and_exits_2(tiny_hf_dirs, work):
    out = work / "never_cli"
    assert_user_error(run_cli("hf-to-mcore", "--hf", tiny_hf_dirs["llama"], "--out", out, "--tp", "3", "--pp", "2"),
                      "--tp=3 does not divide", out)


def test_interruption_and_full_disk_leave_nothing(tiny_hf_dirs, tp1, work, monkeypatch):
    from megatron.core import dist_checkpointing

    import aipo_mp.convert.tensor_io

    llama, mc = tiny_hf_dirs["llama"], tp1["llama"][0]
    # Ctrl-C / SIGTERM in the middle of writing the checkpoint (after some files exist).
    out = work / "interrupted"
    real_save = dist_checkpointing.save

    def save_then_interrupt(state, path, *a, **k):
        real_save(state, path, *a, **k)
        assert any(Path(path).iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(dist_checkpointing, "save", save_then_interrupt)
    rc, _, err = run_main("hf-to-mcore", "--hf", llama, "--out", out)
    assert rc == 130 and "interrupted" in err and not out.exists() and not (work / ".interrupted.partial").exists()
    monkeypatch.undo()

    # A write that fails with ENOSPC (simulated at the safetensors writer).
    def full(f, tensor):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", f.name)

    monkeypatch.setattr(aipo_mp.convert.tensor_io, "write_bytes", full)
    out = work / "full_disk"
    assert_user_error(run_main("mcore-to-hf", "--ckpt", mc, "--out", out), "no space left on device", out)
    monkeypatch.undo()

    # The pre-check: not enough free space for the output.
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert_user_error(run_main("hf-to-mcore", "--hf", llama, "--out", out), "not enough disk space", out)


def test_real_full_disk_on_a_small_tmpfs(tiny_hf_dirs, tp1, work):
    """A real ENOSPC (1 MiB tmpfs, the model is ~2.9 MB): both directions, with the pre-check off."""
    mnt = work / "tmpfs"
    mnt.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert_user_error(run_main("hf-to-mcore", "--hf", tiny_hf_dirs["llama"], "--out", mnt / "mc",
                                   "--skip-space-check"), "no space left on device", mnt / "mc")
        assert_user_error(run_main("mcore-to-hf", "--ckpt", tp1["llama"][0], "--out", mnt / "hf",
                                   "--skip-space-check"), "no space left on device", mnt / "hf")
        assert_user_error(run_main("mcore-to-hf", "--ckpt", tp1["llama"][0], "--out", mnt / "hf"),
                          "not enough disk space", mnt / "hf")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# multi-rank conversions (the CLI starts its own worker processes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.dist
def test_tp2_pp2_round_trip_and_other_layout(tiny_hf_dirs, work):
    """gemma2 (tied embeddings, post-norms) at TP=2 x PP=2: bit-exact both ways (back with three
    converter ranks); the checkpoint loaded at TP=1 gives HF's logits."""
    src, mc, back = tiny_hf_dirs["gemma2"], work / "mc_gemma2_tp2pp2", work / "hf_gemma2_tp2pp2"
    summary = ok(run_cli("hf-to-mcore", "--hf", src, "--out", mc, "--tp", "2", "--pp", "2"))
    assert "layout tp=2 pp=2" in summary and "peak RSS per rank" in summary
    info = json.loads(ok(run_main("inspect", mc, "--json")))
    assert info["layout"] == {"tp": 2, "pp": 2, "vpp": 1} and info["num_params"] == info["num_params_config"]
    # Three converter ranks for a 4-shard checkpoint: mcore-to-hf needs no particular layout.
    ok(run_cli("mcore-to-hf", "--ckpt", mc, "--out", back, "--max-shard-size", "500KB", "--ranks", "3"))
    assert_same_weights(src, back)
    assert max_diff(ok(run_main("verify", "--hf", src, "--ckpt", mc, "--tp", "1", "--pp", "1"))) <= TOL


@pytest.mark.dist
def test_tp2_mistral_and_worker_errors_surface_in_the_parent(tiny_hf_dirs, work):
    """mistral (head_dim != hidden/heads) written at TP=2 reads back at TP=1 with HF's logits; a
    damaged checkpoint makes the TP=2 workers fail, and the parent prints their one line."""
    src, mc = tiny_hf_dirs["mistral"], work / "mc_mistral_tp2"
    ok(run_cli("hf-to-mcore", "--hf", src, "--out", mc, "--tp", "2"))
    assert max_diff(ok(run_main("verify", "--hf", src, "--ckpt", mc, "--tp", "1"))) <= TOL
    damaged = work / "mc_mistral_damaged"
    shutil.copytree(mc, damaged)
    victim = sorted((damaged / "model").glob("*.distcp"))[-1]
    victim.write_bytes(victim.read_bytes()[:100])
    out = work / "hf_from_damaged"
    assert_user_error(run_cli("mcore-to-hf", "--ckpt", damaged, "--out", out), "incomplete or damaged", out)


@pytest.mark.dist
def test_sigterm_stops_workers_and_removes_partial_output(tiny_hf_dirs, work):
    out = work / "mc_sigterm"
    p = subprocess.Popen([sys.executable, "-m", "checkpoint_tools", "hf-to-mcore", "--hf", str(tiny_hf_dirs["llama"]),
                          "--out", str(out), "--tp", "2"], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # workers are starting (imports, model build)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted; partial output removed", err
    assert not out.exists() and not (work / ".mc_sigterm.partial").exists()


VLLM_LOGPROBS = """
import json, sys
from aipo_mp.rounds.engines import logprobs_of
dirs, tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("RESULT" + json.dumps([logprobs_of(d, tokens) for d in dirs]))
"""


@pytest.mark.dist
@pytest.mark.slow
def test_new_families_round_trip_bit_exact_at_tp2_pp2(tiny_hf_dirs, work):
    """Llama-3.1 (llama3 RoPE), Qwen2.5 (q/k/v biases, tied embeddings) and Qwen3 (q/k norms):
    HF -> Megatron at TP=2 x PP=2 -> HF is bit-exact, verify (loaded at TP=1) gives HF's logits,
    and vLLM's teacher-forced log-probs on each exported directory equal transformers' (fp32).
    All six conversions run in one 4-rank launch, the three vLLM engines in one process."""
    from tests.conftest import NEW_MODELS
    from tests.launch import run_ranks

    commands = []
    for name in NEW_MODELS:
        mc, back = work / f"mc_{name}_tp2pp2", work / f"hf_{name}_tp2pp2"
        commands += [["hf-to-mcore", "--hf", str(tiny_hf_dirs[name]), "--out", str(mc), "--tp", "2", "--pp", "2"],
                     ["mcore-to-hf", "--ckpt", str(mc), "--out", str(back), "--max-shard-size", "500KB"]]
    run_ranks(4, "tests.convert_worker", [json.dumps(commands)])
    for name in NEW_MODELS:
        src, mc, back = tiny_hf_dirs[name], work / f"mc_{name}_tp2pp2", work / f"hf_{name}_tp2pp2"
        meta = json.loads((mc / "aipo_checkpoint.json").read_text())
        assert meta["layout"] == {"tp": 2, "pp": 2, "vpp": 1}
        assert_same_weights(src, back)
        if name == "llama3_1":  # the export carries the scaling (transformers would apply default RoPE without it)
            assert json.loads((back / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
        assert max_diff(ok(run_main("verify", "--hf", src, "--ckpt", mc, "--tp", "1", "--pp", "1"))) <= TOL
    check_vllm_logprobs([work / f"hf_{name}_tp2pp2" for name in NEW_MODELS], work)


def check_vllm_logprobs(dirs: list[Path], work: Path) -> None:
    from transformers import AutoModelForCausalLM

    from aipo_mp.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(work / "tok", vocab_size=512, seed=0)
    for d in dirs:  # vLLM loads the tokenizer from the model directory
        for f in tok.iterdir():
            shutil.copy(f, d / f.name)
    # Up to 60 tokens: past the tiny Llama-3.1's original length (32), where llama3 scaling acts.
    g = torch.Generator().manual_seed(5)
    tokens = [[1] + torch.randint(4, 512, (n,), generator=g).tolist() for n in (7, 23, 60)]
    out = subprocess.run([sys.executable, "-c", VLLM_LOGPROBS, json.dumps([str(d) for d in dirs]), json.dumps(tokens)],
                         cwd=ROOT, env=dict(cli_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULT", 1)[1])
    for d, got in zip(dirs, results):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        worst = 0.0
        for ids, lp in zip(tokens, got):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].float()
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            worst = max(worst, float((torch.tensor(lp) - want).abs().max()))
        print(f"vLLM vs transformers teacher-forced log-probs, {d.name}: max |diff| = {worst:.2e}")
        assert worst <= TOL, (d.name, worst)
