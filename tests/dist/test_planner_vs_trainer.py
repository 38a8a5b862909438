"""The planner's per-rank parameter, gradient and optimizer-state bytes equal what the trainer
allocates (exact; bf16 with megatron's distributed optimizer, at DP=2 (tp1) and DP=1), and its
activation estimate is within 25% of the bytes autograd really saves for one micro-batch, for tiny
llama and gemma2 at several layouts, and Qwen2.5 (q/k/v biases, tied embeddings) and Qwen3 (q/k
norms) at TP=2 + SP and PP=2."""

from __future__ import annotations

import json

import pytest

from aipo_mp import planner
from tests.conftest import tiny_arch
from tests.launch import run_ranks
from tests.dist.test_trainer import policy_dirs, run_overrides  # noqa: F401  (fixture)

SEQ = 128
LAYOUTS = {"tp1": (1, 1, False), "tp2sp": (2, 1, True), "pp2": (1, 2, False)}


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
            runs.append({"name": f"{fam}-{name}", "family": fam, "layout": (tp, pp, sp),
                         "overrides": run_overrides(policy_dirs, fam, extra)})
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"runs": runs}))
    run_ranks(2, "tests.planner_worker", [str(spec), str(out)])
    for run, ranks in zip(runs, json.loads(out.read_text())):
        tp, pp, sp = run["layout"]
        arch = tiny_arch(run["family"])
        est = planner.memory_per_gpu(arch, planner.Layout(tp=tp, pp=pp, dp=2 // (tp * pp), sequence_parallel=sp),
                                     dtype="bf16", seq_length=SEQ, distributed_optimizer=True,
                                     num_microbatches_in_flight=1, backend="local", overlap_grad_reduce=False)
        for r in ranks:
            stage = est.stages[r["pp_rank"]]
            assert r["params"] == stage.params, (run["name"], r, stage.params)
            assert r["weight_bytes"] == stage.weights and r["grad_bytes"] == stage.grads, (run["name"], r)
            want = stage.optimizer_by_dp_rank[r["dp_rank"]]
            assert r["optimizer_bytes"] == want, (run["name"], r, want)
            if tp * pp == 1:  # DP=2: each rank holds about half of the fp32 state
                assert want < 0.55 * stage.optimizer_plain, (run["name"], want, stage.optimizer_plain)
            if "activation_bytes" in r:
                planned = stage.activations_by_recompute["none"] + stage.logits
                ratio = planned / r["activation_bytes"]
                assert 0.75 <= ratio <= 1.25, (run["name"], planned, r["activation_bytes"], ratio)
