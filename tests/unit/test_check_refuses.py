"""One validation pass: `aipo-mp check`, `aipo-mp run --dry-run` and `aipo-mp run` refuse the same
invalid values the same way: one `error:` line naming the key and what is allowed, exit code 2,
before anything starts."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT

RECIPE = ROOT / "configs" / "recipes" / "aipo_tiny.yaml"

# (override, the fragment the one error line must hold: the key and what it allows)
INVALID = [
    ("sampling.top_p=2", "sampling.top_p=2: must be in (0, 1]"),
    ("sampling.top_p=0", "sampling.top_p=0: must be in (0, 1]"),
    ("sampling.temperature=-1", "sampling.temperature=-1: must be >= 0"),
    ("sampling.n=0", "sampling.n=0: must be >= 1"),
    ("sampling.max_tokens=0", "sampling.max_tokens=0: must be >= 1"),
    ("sampling.replicas=0", "sampling.replicas=0: must be >= 1"),
    ("sampling.kv_cache_gib=0", "sampling.kv_cache_gib=0: must be > 0"),
    ("sampling.max_model_len=1", "sampling.max_model_len=1: must be >= 2"),
    ("sampling.seed=-3", "sampling.seed=-3: must be >= 0"),
    ('sampling.stop=[""]', "sampling.stop=['']: must be a list of non-empty strings"),
    ("sampling.gpu_memory_utilization=1.5", "sampling.gpu_memory_utilization=1.5: must be in (0, 1]"),
    ("sampling.dtype=int8", "sampling.dtype='int8': choose one of None, auto, float32, bfloat16, float16"),
    ("pairs.min_gap=-1", "pairs.min_gap=-1: must be >= 0"),
    ("pairs.mode=all", "pairs.mode='all': choose one of best_worst, ranked"),
    ("pairs.max_pairs_per_prompt=-1", "pairs.max_pairs_per_prompt=-1: must be >= 0"),
    ("rounds.num_rounds=0", "rounds.num_rounds=0: must be >= 1"),
    ("rounds.reference=latest", "rounds.reference='latest': choose one of previous, initial"),
    ("rounds.synthesize.top_p=0", "rounds.synthesize.top_p=0: must be in (0, 1]"),
    ("rounds.synthesize.max_similarity=1.5", "rounds.synthesize.max_similarity=1.5: must be in (0, 1]"),
    ("rounds.synthesize.total=0", "rounds.synthesize.total=0: must be >= 1"),
    ("reward.kind=oracle", "reward.kind='oracle': choose one of , model, rule, pairwise, judge"),
    ("reward.aggregate=elo", "reward.aggregate='elo': choose one of bradley_terry, copeland"),
    ("reward.batch_size=0", "reward.batch_size=0: must be >= 1"),
    ("reward.replicas=0", "reward.replicas=0: must be >= 1"),
    ("train.global_batch_pairs=0", "train.global_batch_pairs=0: must be >= 1"),
    ("train.lr=-1e-6", "train.lr=-1e-06: must be >= 0"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5: must be in [0, 1]"),
    ("train.schedule=step", "train.schedule='step': choose one of cosine, linear, constant"),
    ("train.seq_length=4", "train.seq_length=4: must be >= 8"),
    ("train.adam_beta2=1.0", "train.adam_beta2=1.0: must be in [0, 1)"),
    ("train.recompute=some", "train.recompute='some': choose one of none, selective, full"),
    ("train.clip_grad=nan", "train.clip_grad=nan: must be a finite number"),
    ("precision.dtype=fp16", "precision.dtype='fp16': choose one of fp32, bf16"),
    ("parallel.tp=0", "parallel.tp=0: must be >= 1"),
    ("data.max_prompt_length=0", "data.max_prompt_length=0: must be >= 1"),
    ("data.on_error=ignore", "data.on_error='ignore': choose one of error, skip"),
    ("reference.mode=other", "reference.mode='other': choose one of initial, model"),
    ("cluster.master_port=70000", "cluster.master_port=70000: must be in [0, 65535]"),
    ("cluster.launcher=pbs", "cluster.launcher='pbs': choose one of local, slurm"),
    ("cluster.nodes=0", "cluster.nodes=0: must be >= 1"),
    # cross-field: the same pass, after the values load
    ("parallel.tp=1 parallel.sequence_parallel=false parallel.pp=2 parallel.vpp=3",
     "pp x vpp = 2 x 3 does not divide the 4 layers; choose pp (x vpp) from [1, 2, 4]"),
    ("parallel.tp=1 parallel.sequence_parallel=false train.global_batch_pairs=7",
     "train.global_batch_pairs=7 is not divisible by the data-parallel size"),
    ("train.min_lr=1", "train.lr=0.001, train.min_lr=1.0: need 0 <= min_lr <= lr"),
    # engine layouts (the tiny policy: 4 heads, 2 key/value heads, 4 layers, dense; 1 node x 2 GPUs)
    ("sampling.tensor_parallel=3", "sampling.tensor_parallel=3 does not divide the 4 attention heads of the policy; "
     "choose sampling.tensor_parallel from [1, 2, 4]"),
    ("sampling.pipeline_parallel=3", "sampling.pipeline_parallel=3 does not divide the 4 layers of the policy; "
     "choose sampling.pipeline_parallel from [1, 2, 4]"),
    ("sampling.expert_parallel=true", "sampling.expert_parallel=true needs a mixture-of-experts policy"),
    ("sampling.data_parallel=2", "sampling.data_parallel=2 (data-parallel ranks inside one engine, with expert "
     "parallelism) is for mixture-of-experts policies; for a dense policy set sampling.data_parallel=1"),
    ("sampling.tensor_parallel=4", "sampling.tensor_parallel=4 (4 GPUs per engine) spans 2 nodes; the allocation "
     "has 1 node(s) x 2 GPUs: use a smaller engine or at least 2 nodes"),
    ("cluster.nodes=2 sampling.tensor_parallel=2 sampling.pipeline_parallel=2 sampling.replicas=2",
     "sampling.replicas=2 engines x 2 nodes each (sampling.tensor_parallel x pipeline_parallel x data_parallel = "
     "2 x 2 x 1) need 4 nodes; the allocation has 2: use sampling.replicas <= 1"),
    ("parallel.tp=1 parallel.sequence_parallel=false cluster.nproc_per_node=3 train.global_batch_pairs=15 "
     "sampling.tensor_parallel=4", "sampling.tensor_parallel=4 (4 GPUs per engine) does not fill whole nodes of "
     "3 GPUs"),
    ("reward.rule=null reward.kind=judge reward.model={llama} reward.tensor_parallel=3",
     "reward.tensor_parallel=3 does not divide the 4 attention heads of reward.model"),
    ("reward.rule=null reward.kind=judge reward.model={llama} reward.pipeline_parallel=3",
     "reward.pipeline_parallel=3 does not divide the 4 layers of reward.model"),
    ("rounds.synthesize.enabled=true rounds.synthesize.min_tokens=9 rounds.synthesize.max_tokens=8",
     "rounds.synthesize.max_tokens=8: must be >= min_tokens (9)"),
    ("reward.model=some_dir", "reward: set exactly one of reward.rule (module:function) or reward.model"),
]


@pytest.fixture(scope="module")
def recipe_args(tiny_hf_dirs, tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("recipe")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    return [str(RECIPE), f"model.path={tiny_hf_dirs['llama']}", f"rounds.prompts={prompts}",
            f"output.dir={tmp / 'run'}"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from aipo_mp.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(argv)
    out, err = capsys.readouterr()
    return exit_code.value.code, out, err


def refuses_with_one_line(code: int, out: str, err: str, fragment: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, (code, out, err)
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err and "ok:" not in out


def test_the_valid_recipe_passes_every_entry(recipe_args, capsys, monkeypatch):
    code, out, err = run_cli(["check", *recipe_args], capsys)
    assert code == 0 and out.startswith("ok: llama"), (out, err)
    code, out, err = run_cli(["run", *recipe_args, "--dry-run", "--json"], capsys)
    assert code == 0 and '"stages"' in out, err


@pytest.mark.parametrize("override,fragment", INVALID, ids=[o for o, _ in INVALID])
def test_check_run_and_dry_run_refuse_the_same_way(override, fragment, recipe_args, tiny_hf_dirs, capsys,
                                                   monkeypatch):
    from aipo_mp.rounds import run

    def started(*_args, **_kwargs):
        raise AssertionError("a stage started although the config is invalid")

    monkeypatch.setattr(run.RoundRunner, "run", started)
    overrides = override.format(llama=tiny_hf_dirs["llama"]).split()  # {llama}: a tiny HF model dir
    refuses_with_one_line(*run_cli(["check", *recipe_args, *overrides], capsys), fragment)
    refuses_with_one_line(*run_cli(["run", *recipe_args, *overrides, "--dry-run"], capsys), fragment)
    refuses_with_one_line(*run_cli(["run", *recipe_args, *overrides], capsys), fragment)
    run_dir = recipe_args[-1].split("=", 1)[1]
    assert not (ROOT / run_dir).exists() or not any((ROOT / run_dir).iterdir())


def test_at_least_thirty_values_across_every_section():
    sections = {o.split(".")[0] for o, _ in INVALID}
    assert len(INVALID) >= 30
    assert {"sampling", "pairs", "rounds", "reward", "train", "precision", "parallel", "data", "reference",
            "cluster"} <= sections
