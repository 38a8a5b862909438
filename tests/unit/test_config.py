"""Config loading, overrides and validation: each bad config is one clear line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aipo_mp.config import load_config
from aipo_mp.errors import ConfigError
from aipo_mp.runtime.platform import first_slurm_host, read_dist_env
from aipo_mp.validate import validate
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "models" / "tiny_llama.yaml")  # 4 heads, 2 query groups, 4 layers

BAD = [
    (["parallel.tp=3"], "does not divide the 4 attention heads", None),
    (["parallel.tp=4"], "does not divide the 2 query groups", None),
    (["parallel.pp=3"], "does not divide the 4 layers", None),
    (["parallel.pp=2", "parallel.vpp=4"], "pp x vpp = 2 x 4 does not divide the 4 layers", None),
    (["parallel.tp=2"], "world size 3 is not a multiple of tp x pp x cp = 2", 3),
    (["parallel.sequence_parallel=true"], "sequence_parallel needs parallel.tp > 1", None),
    (["train.lrr=1e-6"], "unknown config key train.lrr; did you mean train.lr?", None),
    (["train.steps=abc"], "train.steps: expected int, got str 'abc'", None),
    (["precision.dtype=fp16"], "precision.dtype='fp16': choose one of fp32, bf16", None),
    (["objective.name=dpoo"], "unknown objective 'dpoo'", None),
    (["objective.name=dpo", "objective.bogus=1"], "bogus", None),
    # NaN fails every range check, so it used to pass (and a NaN clip_grad disabled clipping)
    (["train.lr=nan"], "train.lr=nan: must be a finite number", None),
    (["train.clip_grad=nan"], "train.clip_grad=nan: must be a finite number", None),
    (["train.lr=.inf"], "train.lr=inf: must be a finite number", None),
    (["sampling.temperature=.nan"], "sampling.temperature=nan: must be a finite number", None),
    (["data.warn_truncated_share=-.inf"], "data.warn_truncated_share=-inf", None),
    (["objective.beta=.nan"], "beta must be finite", None),
    (["train.seq_length=64", "data.max_prompt_length=512"], "data.max_prompt_length=512 leaves no room", None),
]


def run_check(overrides, world_size, capsys):
    from aipo_mp.cli import main

    argv = ["check", TINY, *overrides] + (["--world-size", str(world_size)] if world_size else [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("overrides,message,world_size", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_is_one_clear_line(overrides, message, world_size, capsys):
    code, _out, err = run_check(overrides, world_size, capsys)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


def test_good_config_passes(capsys):
    code, out, err = run_check(["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], 8, capsys)
    assert code == 0, err
    assert "tp=2 pp=2" in out and "dp=2" in out


def test_cli_process_exit_code_and_no_traceback():
    """The real console entry point, in its own process."""
    proc = subprocess.run([sys.executable, "-m", "aipo_mp.cli", "check", TINY, "parallel.tp=3"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_several_errors_one_line_each():
    cfg = load_config(TINY, ["parallel.tp=3", "parallel.pp=3"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert len(e.value.errors) == 2


def test_defaults_include_and_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"defaults: [{TINY}]\ntrain:\n  lr: 1.0e-6\n  steps: 5\nparallel:\n  tp: 2\n")
    cfg = load_config(recipe, ["train.steps=7", "objective.beta=0.2"])
    assert cfg.model.arch.hidden_size == 128  # from the included model config
    assert cfg.train.lr == 1e-6 and cfg.train.steps == 7 and cfg.parallel.tp == 2
    assert cfg.objective.params == {"beta": 0.2}


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "bad.yaml" in str(e.value) and "not valid YAML" in str(e.value)


def test_dist_env_from_slurm_and_torchrun():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[003-004,9]", "SLURM_JOB_ID": "4242"}
    env = read_dist_env(environ=slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (3, 8, 1, "gpu003", "slurm")
    assert env.master_port == 20000 + 4242
    torchrun = dict(slurm, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234")
    env = read_dist_env(environ=torchrun)
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.launcher) == (1, 2, "h", 1234, "torchrun")
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("a-b[10-12]") == "a-b10"


def test_local_rendezvous_ports_are_free_and_below_the_ephemeral_range(monkeypatch):
    """Ports in Linux's ephemeral range can be taken by an outgoing connection between the check
    and rank 0's bind (a CI hang); local launches pick theirs below it, and never one in use."""
    import socket

    from aipo_mp.runtime import spawn

    ports = spawn.free_ports(8)
    assert len(set(ports)) == 8 and all(10000 <= p < 20000 for p in ports), ports
    with socket.socket() as held:
        held.bind(("", ports[0]))
        held.listen()
        monkeypatch.setattr(spawn, "LOCAL_PORTS", range(ports[0], ports[0] + 3))
        assert ports[0] not in spawn.free_ports(2)
        monkeypatch.setattr(spawn, "LOCAL_PORTS", range(ports[0], ports[0] + 1))
        with pytest.raises(OSError, match="no 1 free TCP ports"):
            spawn.free_ports(1)


@pytest.mark.parametrize("recipe", ["aipo_mistral_large_123b", "aipo_llama3_70b", "aipo_gemma2_27b",
                                    "aipo_mistral_nemo_12b", "aipo_tiny", "aipo_llama3_3_70b", "aipo_llama3_1_405b",
                                    "aipo_qwen3_235b_a22b", "aipo_qwen3_235b_a22b_h200", "aipo_qwen3_30b_a3b",
                                    "aipo_mixtral_8x22b", "aipo_llama3_1_405b_h200", "aipo_deepseek_v3"])
def test_recipes_validate_at_their_world_size(recipe):
    """Every shipped recipe is a valid layout for the cluster it names (architecture from the
    model config it includes; the checkpoint path is a placeholder on this machine)."""
    cfg = load_config(ROOT / "configs" / "recipes" / f"{recipe}.yaml")
    cfg.model.path = None
    assert cfg.model.arch is not None
    validate(cfg, world_size=cfg.cluster.nodes * cfg.cluster.nproc_per_node)


def test_a_default_shrinks_to_fit_with_a_note(capsys):
    """train.seq_length=64 alone used to be refused: the default data.max_prompt_length=512 left
    no room for a response. A value the user set is still refused (see BAD)."""
    code, out, err = run_check(["train.seq_length=64"], None, capsys)
    assert code == 0, err
    assert "note: data.max_prompt_length (default 512)" in err and "using 16" in err
    assert load_config(TINY, ["train.seq_length=64"]).data.max_prompt_length == 16
    assert load_config(TINY).data.max_prompt_length == 512  # fits the default seq_length: untouched


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import shutil

    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer
    from tests.conftest import tiny_arch

    base = tmp_path_factory.mktemp("check_data")
    tok = build_tiny_tokenizer(base / "tok", vocab_size=512)
    model = save_hf_model(tiny_arch("llama"), base / "llama", seed=3, tokenizer_dir=tok)
    bare = base / "no_tokenizer"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja", "special_tokens_map.json"))
    return {"model": model, "bare": bare, "pairs": write_jsonl(marker_pairs(10, seed=1), base / "pairs.jsonl")}


def test_check_reads_the_data_and_prints_the_counts(model_dirs, capsys):
    code, out, err = run_check([f"model.path={model_dirs['model']}", f"data.train={model_dirs['pairs']}",
                                "train.seq_length=256", "train.global_batch_pairs=4"], None, capsys)
    assert code == 0, err
    assert "data: 10 rows read (jsonl), 10 pairs kept" in out
    assert "would train on 10 pairs: 2 steps of 4 pairs" in out


def test_check_refuses_bad_data_and_a_missing_tokenizer(model_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": [], "rejected": "c"}\n')
    for model, data, needle in ((model_dirs["model"], bad, "bad.jsonl:2: field 'chosen' is an empty message list"),
                                (model_dirs["bare"], model_dirs["pairs"], "has no tokenizer files")):
        code, _out, err = run_check([f"model.path={model}", f"data.train={data}"], None, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
