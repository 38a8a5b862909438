"""The planner's per-rank parameter, gradient and optimizer-state bytes equal what the trainer
allocates (exact; bf16 with megatron's distributed optimizer, at DP=2 (tp1) and DP=1), and its
activation estimate (for the measured row's length) is within 25% of the bytes autograd really saves
for one micro-batch, for tiny
llama and gemma2 at several layouts, and Qwen2.5 (q/k/v biases, tied embeddings) and Qwen3 (q/k
norms) at TP=2 + SP and PP=2. The same for mixtures of experts (tiny Qwen3-MoE with a dense layer,
tiny Mixtral; 4 experts, top-2) on 4 ranks: EP=2 (DP=4, expert-DP=2: megatron's separate expert
buffer sharded over 2 ranks, the dense one over 4), EP=4 (expert-DP=1), TP=2 x EP=2 with SP (DP=2,
expert-DP=2), TP=2 x EP=2 x ETP=2 (expert-DP=1), PP=2 x EP=2, and frozen routers (no gradient, no
optimizer state); tiny DeepSeek-V3 (latent attention, a shared expert, 8 experts in 2 groups, a
dense layer 0) at TP=2 x EP=2 with SP."""

from __future__ import annotations

import json

import pytest

from aipo_mp import planner
from tests.conftest import tiny_arch
from tests.dist.test_trainer import COMMON, policy_dirs, run_overrides  # noqa: F401  (fixture)
from tests.launch import run_ranks

SEQ = 128
LAYOUTS = {"tp1": (1, 1, False), "tp2sp": (2, 1, True), "pp2": (1, 2, False)}


def check_against_plan(run: dict, ranks: list[dict], world: int) -> None:
    """Every rank's allocation equals the planner's numbers for its pipeline stage and its place
    in the dense (tp, dp) and expert (etp, ep, expert-DP) meshes."""
    tp, pp, sp, ep, etp, frozen = run["layout"]
    arch = tiny_arch(run["family"])
    lay = planner.Layout(tp=tp, pp=pp, dp=world // (tp * pp), sequence_parallel=sp, ep=ep, etp=etp)
    est = planner.memory_per_gpu(arch, lay, dtype="bf16", seq_length=SEQ, distributed_optimizer=True,
                                 num_microbatches_in_flight=1, backend="local", overlap_grad_reduce=False,
                                 freeze_router=frozen)
    counts = planner.param_counts(arch, tp, pp, 1, ep, etp)
    assert sorted(r["rank"] for r in ranks) == list(range(world)), run["name"]
    for r in ranks:
        name = run["name"]
        stage = est.stages[r["pp_rank"]]
        local = r["tp_rank"] + tp * r["dp_rank"]  # the rank's place in its pipeline stage
        assert r["rank"] == r["pp_rank"] * tp * lay.dp + local, (name, r)  # megatron's order: tp, dp, pp
        assert r["edp_rank"] == local // (ep * etp), (name, r)  # expert mesh: etp, ep, expert-DP
        assert r["all_params"] == stage.params, (name, r, stage.params)
        buffered = counts.stages[r["pp_rank"]].experts if ep > 1 else 0
        assert r["expert_params"] == buffered, (name, r, buffered)
        routers = counts.stages[r["pp_rank"]].routers if frozen else 0
        assert r["params"] == stage.params - routers, (name, r)
        assert r["weight_bytes"] == stage.weights and r["grad_bytes"] == stage.grads, (name, r)
        want = stage.optimizer_by_rank[local]
        assert r["optimizer_bytes"] == want, (name, r, want)
        if tp * pp == 1 and world > 1:  # DP>1: each rank holds about 1/DP of the fp32 state
            assert want < 1.1 * stage.optimizer_plain / min(lay.dp, lay.edp), (name, want, stage.optimizer_plain)
        if "activation_bytes" in r:  # planned for the measured row's length (rows are sized to content)
            row = planner.memory_per_gpu(arch, lay, dtype="bf16", seq_length=r["row_tokens"], distributed_optimizer=True,
                                         num_microbatches_in_flight=1, backend="local", overlap_grad_reduce=False,
                                         freeze_router=frozen).stages[r["pp_rank"]]
            planned = row.activations_by_recompute["none"] + row.logits
            ratio = planned / r["activation_bytes"]
            assert 0.75 <= ratio <= 1.25, (name, planned, r["activation_bytes"], ratio)


@pytest.mark.dist
@pytest.mark.slow
def test_planner_matches_trainer_allocation(policy_dirs, tmp_path):  # noqa: F811
    runs = []
    layouts_of = {"llama": tuple(LAYOUTS), "gemma2": tuple(LAYOUTS), "qwen2": ("tp2sp", "pp2"), "qwen3": ("tp2sp", "pp2")}
    for fam, names in layouts_of.items():
        for name in names:
            tp, pp, sp = LAYOUTS[name]
            extra = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={str(sp).lower()}",
                     "output.dir=" + str(tmp_path / f"{fam}-{name}"), "train.steps=1", "precision.dtype=bf16"]
            runs.append({"name": f"{fam}-{name}", "family": fam, "layout": (tp, pp, sp, 1, 1, False),
                         "overrides": run_overrides(policy_dirs, fam, extra)})
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"runs": runs}))
    run_ranks(2, "tests.planner_worker", [str(spec), str(out)])
    for run, ranks in zip(runs, json.loads(out.read_text())):
        check_against_plan(run, ranks, 2)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict:
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    base = tmp_path_factory.mktemp("moe_planner")
    tok = build_tiny_tokenizer(base / "tokenizer", vocab_size=512)
    dirs = {f: save_hf_model(tiny_arch(f), base / f, seed=3, tokenizer_dir=tok) for f in ("qwen3_moe", "mixtral", "deepseek_v3")}
    dirs["pairs"] = write_jsonl(marker_pairs(32, seed=1), base / "pairs.jsonl")
    return dirs


# name: (family, tp, pp, sp, ep, etp, freeze_router), on 4 ranks
MOE_LAYOUTS = {
    "qwen3_moe-ep2": ("qwen3_moe", 1, 1, False, 2, 1, False),  # DP 4, expert-DP 2
    "qwen3_moe-tp2ep2": ("qwen3_moe", 2, 1, True, 2, 1, False),  # DP 2, expert-DP 2
    "qwen3_moe-tp2ep2etp2": ("qwen3_moe", 2, 1, True, 2, 2, False),  # DP 2, expert-DP 1
    "qwen3_moe-pp2ep2": ("qwen3_moe", 1, 2, False, 2, 1, False),  # stage 0 holds the dense layer 1
    "mixtral-ep4": ("mixtral", 1, 1, False, 4, 1, False),  # DP 4, expert-DP 1
    "mixtral-ep2frozen": ("mixtral", 1, 1, False, 2, 1, True),
    "deepseek_v3-tp2ep2": ("deepseek_v3", 2, 1, True, 2, 1, False),  # latent attention, shared expert
}


@pytest.mark.dist
@pytest.mark.slow
def test_planner_matches_trainer_allocation_moe(moe_dirs, tmp_path):
    runs = []
    for name, (fam, tp, pp, sp, ep, etp, frozen) in MOE_LAYOUTS.items():
        extra = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={str(sp).lower()}",
                 f"parallel.ep={ep}", f"parallel.etp={etp}", f"moe.freeze_router={str(frozen).lower()}",
                 "output.dir=" + str(tmp_path / name), "train.steps=1", "precision.dtype=bf16",
                 "train.micro_batch_pairs=1"]
        runs.append({"name": name, "family": fam, "layout": (tp, pp, sp, ep, etp, frozen),
                     "overrides": [f"model.path={moe_dirs[fam]}", f"data.train={moe_dirs['pairs']}", *COMMON, *extra]})
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"runs": runs}))
    run_ranks(4, "tests.planner_worker", [str(spec), str(out)], timeout=1200)
    for run, ranks in zip(runs, json.loads(out.read_text())):
        check_against_plan(run, ranks, 4)
