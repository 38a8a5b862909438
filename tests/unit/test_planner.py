"""The layout planner: parameter counts per rank (by hand-listed tensor shapes), memory, FLOPs,
ranking and the `aipo-mp plan` CLI. Pure arithmetic: no torch, no processes."""

from __future__ import annotations

import math

import pytest

from aipo_mp import planner
from aipo_mp.config import load_config
from aipo_mp.models import num_params
from aipo_mp.planner import Layout, memory_per_gpu, param_counts, plan, step_time
from tests.conftest import ROOT

MODELS = ROOT / "configs" / "models"
ALL = ["mistral_large_123b", "llama3_70b", "gemma2_27b", "mistral_nemo_12b", "llama3_8b",
       "llama3_1_405b", "llama3_3_70b", "qwen2_5_72b", "qwen3_32b",
       "tiny_llama", "tiny_mistral", "tiny_gemma2", "tiny_llama3_1", "tiny_qwen2", "tiny_qwen3"]


def arch_of(name: str):
    return load_config(MODELS / f"{name}.yaml").model.arch


def numel(shapes: list[tuple]) -> int:
    return sum(math.prod(s) for s in shapes)


# ---------------------------------------------------------------------------------------------
# Parameter counts: megatron's tensors listed by hand, per (pipeline stage, TP rank)
# ---------------------------------------------------------------------------------------------

# tiny_llama: h=128, ffn=256, 4 heads, 2 KV heads, head_dim 32, vocab 512, 4 layers, untied. tp=2:
LLAMA_TP2_LAYER = [
    (128, 128),  # self_attention.linear_qkv.weight: (4 + 2*2) * 32 / 2 rows
    (128,),  # self_attention.linear_qkv.layer_norm_weight (input norm, replicated)
    (128, 64),  # self_attention.linear_proj.weight: [h, 4*32/2]
    (256, 128),  # mlp.linear_fc1.weight: [2*256/2, h] (gate and up)
    (128,),  # mlp.linear_fc1.layer_norm_weight (pre-MLP norm)
    (128, 128),  # mlp.linear_fc2.weight: [h, 256/2]
]
# tiny_mistral: head_dim 48 != 128/4. tp=1:
MISTRAL_TP1_LAYER = [(384, 128), (128,), (128, 192), (512, 128), (128,), (128, 256)]
# tiny_gemma2: as tiny_llama plus post-attention and post-feed-forward norms; tied embeddings. tp=2:
GEMMA2_TP2_LAYER = LLAMA_TP2_LAYER + [(128,), (128,)]


def test_tiny_llama_tp2_pp2_by_hand():
    counts = param_counts(arch_of("tiny_llama"), tp=2, pp=2)
    first = [(256, 128)] + 2 * LLAMA_TP2_LAYER  # embedding.word_embeddings: [512/2, h]
    last = 2 * LLAMA_TP2_LAYER + [(128,), (256, 128)]  # final_layernorm, output_layer [512/2, h]
    assert counts.per_rank() == [numel(first), numel(last)]
    assert counts.per_rank() == [180736, 180864]  # also what megatron-core 0.16.1 allocated
    assert counts.max_per_rank == numel(last) and counts.binding_stage == 1


def test_tiny_mistral_tp1_pp4_by_hand():
    counts = param_counts(arch_of("tiny_mistral"), tp=1, pp=4)
    layer = numel(MISTRAL_TP1_LAYER)
    want = [layer + 512 * 128, layer, layer, layer + 128 + 512 * 128]
    assert counts.per_rank() == want
    assert counts.per_rank() == [237824, 172288, 172288, 237952]  # megatron-core 0.16.1
    assert counts.per_layer == layer


def test_tiny_gemma2_tied_copy_on_last_stage():
    arch = arch_of("tiny_gemma2")
    counts = param_counts(arch, tp=2, pp=2)
    first = [(256, 128)] + 2 * GEMMA2_TP2_LAYER
    last = 2 * GEMMA2_TP2_LAYER + [(128,), (256, 128)]  # the tied output layer's copy
    assert counts.per_rank() == [numel(first), numel(last)] == [181248, 181376]
    assert counts.stages[1].tied_copy
    # One stage: the output layer *is* the embedding, no copy.
    one = param_counts(arch, tp=2, pp=1)
    assert one.per_rank() == [numel([(256, 128)] + 4 * GEMMA2_TP2_LAYER + [(128,)])]
    # pp=4: megatron-core allocated 213504 / 147968 / 147968 / 213632 per rank.
    assert param_counts(arch, tp=1, pp=4).per_rank() == [213504, 147968, 147968, 213632]


def test_vpp_keeps_per_rank_counts():
    arch = arch_of("tiny_llama")
    assert param_counts(arch, 1, 2, 2).per_rank() == param_counts(arch, 1, 2, 1).per_rank() == [360960, 361088]
    with pytest.raises(planner.PlanError):
        param_counts(arch, 1, 2, 4)  # 4 layers do not split into 2 x 4 chunks


def valid_layouts():
    """(model, tp, pp) combinations the model's heads and layers allow."""
    for name in ALL:
        arch = arch_of(name)
        for tp, pp in [(1, 1), (2, 2), (1, 4), (2, 1)]:
            if arch.num_layers % pp == 0 and arch.num_key_value_heads % tp == 0:
                yield name, tp, pp


@pytest.mark.parametrize("name,tp,pp", list(valid_layouts()))
def test_shards_add_up_to_the_model(name, tp, pp):
    assert param_counts(arch_of(name), tp, pp).model_total == num_params(arch_of(name))


def test_mistral_large_total():
    arch = arch_of("mistral_large_123b")
    counts = param_counts(arch, tp=8, pp=8)
    layer = 12288 * (96 + 2 * 8) * 128 + 12288 * 96 * 128 + 3 * 12288 * 28672 + 2 * 12288
    assert layer == 1_384_144_896
    by_hand = 88 * layer + 2 * 32768 * 12288 + 12288  # layers, embedding + output layer, final norm
    assert counts.model_total == num_params(arch) == by_hand == 122_610_069_504
    assert abs(num_params(arch) / 1e9 - 122.6) < 0.05
    assert abs(param_counts(arch).per_layer / 1e9 - 1.38) < 0.01  # MODELS.md: ~1.38B per layer
    # Stage 0 holds the embedding, the last stage the final norm and the output layer.
    assert counts.stages[0].embedding == counts.stages[-1].output_layer == 32768 // 8 * 12288


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def test_static_memory_bytes():
    arch = arch_of("mistral_large_123b")
    lay = Layout(tp=8, pp=8, dp=4)
    mem = memory_per_gpu(arch, lay, "bf16", 2560, recompute="none", distributed_optimizer=True)
    p = param_counts(arch, 8, 8).stages[mem.binding.stage].total
    b = mem.binding
    assert (b.weights, b.grads) == (2 * p, 4 * p)
    assert b.optimizer == b.optimizer_distributed == 12 * p / 4 and b.optimizer_plain == 12 * p
    plain = memory_per_gpu(arch, lay, "bf16", 2560, distributed_optimizer=False)
    assert plain.binding.optimizer == 12 * plain.binding.params


def test_distributed_optimizer_shards_follow_megatron_buffer_layout():
    """Worked by hand from megatron's _ParamAndGradBuffer rules: parameters in reverse order,
    starts padded to 64, buckets padded to lcm(dp, 128) and split evenly over the DP ranks."""
    from aipo_mp.planner import dp_shard_numels

    # [0,200) second param, [256,356) first; bucket [0,384): rank 0 [0,192), rank 1 [192,384).
    assert dp_shard_numels([(100, False), (200, False)], 2) == [192, 108]
    # Buckets of 250: [0,300) -> [0,384); [384,584) + [640,740) -> [384,768).
    assert dp_shard_numels([(100, False), (200, False), (300, False)], 2, bucket_size=250) == [384, 216]
    # A shared embedding gets its own bucket: [0,256) (the other param, [0,200)) in shards of 64,
    # and [256,384) (the embedding, [256,356)) in shards of 32.
    assert dp_shard_numels([(100, True), (200, False)], 4) == [64 + 32, 64 + 32, 64 + 32, 8 + 4]
    assert dp_shard_numels([(100, True), (200, False)], 1) == [300]


def test_activation_formula():
    arch = arch_of("mistral_large_123b")
    h, f, hq, hkv, a, s = 12288, 28672, 96 * 128, 8 * 128, 96, 2560
    # Transformer Engine (fused norms, flash attention), sequence parallel over tp=8:
    # norm inputs 2·2h + GEMM inputs 2·2h, q/k/v/out 2·(2hq + 2hkv), MLP 2·5f, lse 4a.
    want = s * (8 * h + 2 * (2 * hq + 2 * hkv) + 10 * f + 4 * a) / 8
    assert planner.layer_activation_bytes(arch, s, 1, 8, True, "none") == pytest.approx(want)
    # Without SP only the head-sharded part divides by tp.
    no_sp = s * (8 * h + (2 * (2 * hq + 2 * hkv) + 10 * f + 4 * a) / 8)
    assert planner.layer_activation_bytes(arch, s, 1, 8, False, "none") == pytest.approx(no_sp)
    assert planner.layer_activation_bytes(arch, s, 1, 8, True, "full") == pytest.approx(2 * s * h / 8)
    # Unfused attention (Gemma-2's soft-capping) runs per sequence (a pair's two sequences of
    # L = s/2 in a row): it keeps fp32 scores, bf16 probabilities and the fp32 tanh output per head,
    # L per token, fp32 q and repeated k and the repeated v, and each sequence's [L, L] bool mask;
    # selective recomputation drops all of it.
    g = arch_of("gemma2_27b")
    s, L, a, hq, hkv = 4096, 2048, 32, 32 * 128, 16 * 128
    full_scores = planner.layer_activation_bytes(g, s, 1, 1, False, "none", backend="local")
    selective = planner.layer_activation_bytes(g, s, 1, 1, False, "selective", backend="local")
    unfused = 4 * hq + 4 * hq + 2 * hq - 2 * (hq + 2 * hkv)  # fp32 q, fp32 repeated k, repeated v replace q, k, v
    assert full_scores - selective == pytest.approx(s * (unfused + L * a * (4 + 2 + 4)) + 2 * L * L)
    # Two pairs per row: four sequences of s/4, half the scores of one pair per row.
    two = planner.layer_activation_bytes(g, s, 1, 1, False, "none", backend="local", pairs_per_row=2)
    assert full_scores - two == pytest.approx(s * (L - L / 2) * a * 10 + 2 * L * L - 4 * (L / 2) ** 2)
    # Without soft-capping the local backend's per-sequence SDPA keeps only its output and an fp32
    # log-sum-exp per head: nothing grows with the sequence length beyond the tokens.
    llama = arch_of("llama3_8b")
    one, double = (planner.layer_activation_bytes(llama, n, 1, 1, False, "none", backend="local") for n in (2048, 4096))
    assert double == pytest.approx(2 * one)


def test_microbatches_in_flight():
    assert [planner.in_flight_passes(4, 1, r, 32) for r in range(4)] == [4, 3, 2, 1]
    assert planner.in_flight_passes(4, 1, 0, 2) == 2  # fewer micro-batches than stages
    # Interleaved: pp·(1 + (pp-1)/(pp·vpp)) micro-batches' worth on the first stage.
    assert planner.in_flight_passes(4, 2, 0, 32) == pytest.approx(4 * (1 + 3 / 8))
    arch = arch_of("mistral_large_123b")
    mem = memory_per_gpu(arch, Layout(8, 4, 1, 2), num_microbatches=16)
    per_layer = planner.layer_activation_bytes(arch, 2560, 1, 8, True, "none")
    assert mem.stages[0].activations_by_recompute["none"] == pytest.approx(4 * 22 * per_layer + 4 * 2 * 2560 * 12288 / 8)


def test_reference_modes():
    arch = arch_of("llama3_70b")
    lay = Layout(8, 4, 1, 1)
    init = memory_per_gpu(arch, lay, reference_mode="initial")
    live = memory_per_gpu(arch, lay, reference_mode="model-live")
    pre = memory_per_gpu(arch, lay, reference_mode="model")
    b = init.binding
    assert b.reference_by_mode["initial"] == 0 and b.reference_by_mode["model-live"] == 2 * b.params
    assert live.total == pytest.approx(init.total + 2 * b.params)
    assert init.total <= pre.total <= live.total


def test_123b_on_8_gpus_at_tp1_does_not_fit():
    arch = arch_of("mistral_large_123b")
    gpu = planner.GPUS["h100-80gb"]
    for pp in (1, 2, 4, 8):
        lay = Layout(tp=1, pp=pp, dp=8 // pp)
        assert not planner.layout_problems(arch, lay, 8, 32, 2560)
        mem = memory_per_gpu(arch, lay, recompute="full", num_microbatches=32 // lay.dp)
        assert mem.total > gpu.memory_bytes
    assert not any(r.fits for r in plan(arch, 8, "h100-80gb"))


def test_sampling_memory():
    arch = arch_of("mistral_large_123b")
    sm = planner.sampling_memory(arch, "h100-80gb", 8, 2560)
    assert sm.kv_bytes_per_token == 2 * 88 * 1 * 128 * 2  # K and V, 8 KV heads / tp 8, bf16
    assert sm.weights == 2 * param_counts(arch, 8, 1).max_per_rank
    free = 0.9 * planner.GPUS["h100-80gb"].memory_bytes - sm.weights - planner.VLLM_OVERHEAD
    assert sm.kv_tokens == int(free // sm.kv_bytes_per_token)
    assert planner.sampling_memory(arch, "h100-80gb", 1).kv_tokens == 0  # 245 GB of weights
    assert planner.choose_vllm_tp(arch, "h100-80gb").tp == 8


# ---------------------------------------------------------------------------------------------
# FLOPs and time
# ---------------------------------------------------------------------------------------------


def test_flops_and_mfu():
    arch = arch_of("llama3_8b")
    n = num_params(arch) - arch.vocab_size * arch.hidden_size
    f = planner.forward_flops_per_token(arch, 2048)
    assert f == 2 * n + 4 * 32 * 4096 * 1024  # attention within one sequence of 2048 / 2
    # No pipeline, no data parallelism: MFU is exactly the assumed efficiency.
    t = step_time(arch, Layout(8, 1, 1, 1), 8, "h100-80gb", 2048, 32, efficiency=0.4)
    assert t.tokens == 32 * 2048 and t.mfu == pytest.approx(0.4)
    assert t.model_flops == pytest.approx(4 * f * 32 * 2048)  # policy 3F + reference F
    # Full recomputation adds a forward: 4/5 of the efficiency becomes model FLOPs.
    rc = step_time(arch, Layout(8, 1, 1, 1), 8, "h100-80gb", 2048, 32, "full", efficiency=0.4)
    assert rc.mfu == pytest.approx(0.4 * 4 / 5)
    # Pipeline bubble (pp-1)/(vpp·M) and no reference pass.
    pp = step_time(arch, Layout(2, 4, 1, 1), 8, "h100-80gb", 2048, 32, reference_forward=False)
    assert pp.bubble_fraction == pytest.approx(3 / 32) and pp.mfu == pytest.approx(0.4 / (1 + 3 / 32))


def test_dp_traffic_slows_the_step():
    arch = arch_of("llama3_70b")
    one = step_time(arch, Layout(8, 4, 1, 1), 32, "h100-80gb", 2560, 32)
    assert one.dp_comm_s == 0
    two = step_time(arch, Layout(8, 4, 1, 2), 64, "h100-80gb", 2560, 32)
    p = param_counts(arch, 8, 4).max_per_rank
    assert two.dp_comm_s == pytest.approx(0.5 * p * 6 / 40e9)  # across nodes: 40 GB/s per GPU


# ---------------------------------------------------------------------------------------------
# Enumeration and ranking
# ---------------------------------------------------------------------------------------------


def test_enumeration_rules():
    arch = arch_of("mistral_large_123b")
    lays = planner.enumerate_layouts(arch, 64, 8, 32, 2560)
    assert lays and all(l.world == 64 and 32 % l.dp == 0 and 88 % (l.pp * l.vpp) == 0 for l in lays)
    assert all(l.tp in (1, 2, 4, 8) for l in lays)
    assert Layout(8, 4, 2, 2) in lays and Layout(8, 8, 1, 1) in lays
    assert not planner.enumerate_layouts(arch, 3)  # 3 GPUs: dp=3 does not divide 32 pairs
    assert planner.layout_problems(arch, Layout(3, 1, 1, 1))  # tp=3 does not divide 96 heads


def test_ranking_puts_fitting_layouts_first():
    arch = arch_of("mistral_large_123b")
    rows = plan(arch, 64, "h100-80gb", 2560, 32)
    fits = [r.fits for r in rows]
    assert any(fits) and not all(fits)
    assert fits == sorted(fits, reverse=True)
    fitting = [r for r in rows if r.fits]
    assert [r.time.total_s for r in fitting] == sorted(r.time.total_s for r in fitting)
    top = rows[0]
    assert top.headroom >= 0.10 and top.layout.tp == 8
    assert top.memory.total <= 0.9 * planner.GPUS["h100-80gb"].memory_bytes


def test_tie_break_on_fewer_gpus_per_replica():
    from dataclasses import replace

    rows = plan(arch_of("tiny_llama"), 4, seq_length=64)
    big = next(r for r in rows if r.gpus_per_replica == 4)
    small = next(r for r in rows if r.gpus_per_replica == 1)
    same = [replace(r, fits=True, time=replace(r.time, total_s=1.0)) for r in (big, small)]
    assert [r.gpus_per_replica for r in planner.rank_rows(same)] == [1, 4]
    slow_fit = replace(small, fits=True, time=replace(small.time, total_s=9.0))
    fast_no = replace(big, fits=False, time=replace(big.time, total_s=0.1))
    assert planner.rank_rows([fast_no, slow_fit])[0] is slow_fit


def test_format_plan():
    arch = arch_of("mistral_large_123b")
    text = planner.format_plan(plan(arch, 128, "h100-80gb", model_name="mistral_large_123b"), top=5)
    lines = text.splitlines()
    header = next(l for l in lines if l.lstrip().startswith("#"))
    for col in ("tp", "pp", "vpp", "dp", "weights", "grads", "opt:dist", "opt:nodist", "act:none", "act:full",
                "ref:model", "peak", "fits", "head", "step_s", "MFU"):
        assert col in header
    assert sum(1 for l in lines if l.strip()[:2].strip().isdigit() and " yes " in l) == 5
    assert "KV tokens" in text and text.rstrip().splitlines()[-1].startswith("why: tp=8")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

BIG = str(MODELS / "mistral_large_123b.yaml")


def test_cli_prints_a_table(capsys):
    code = planner.main([BIG, "--gpus", "64", "--gpu", "h100-80gb", "--seq-length", "2560",
                         "--global-batch-pairs", "32", "--gpus-per-node", "8", "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "64 x h100-80gb" in out and "why:" in out and " yes " in out
    assert planner.main(["plan", BIG, "--gpus", "64", "--top", "1"]) == 0  # a leading "plan" is accepted


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0"], "--gpus=0"),
    (["--gpus", "8", "--gpu", "v100"], "unknown GPU 'v100'"),
    (["--gpus", "eight"], "invalid int value"),
    ([], "required: --gpus"),
    (["--gpus", "3"], "no valid layout of 3 GPUs"),
    (["--gpus", "8", "--seq-length", "2561"], "must be even"),
    (["--gpus", "8", "--reference-mode", "ema"], "--reference-mode=ema"),
    (["--gpus", "8", "--bogus"], "unrecognized arguments"),
])
def test_cli_bad_input_exits_2(capsys, args, message):
    assert planner.main([BIG, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_missing_config(capsys, tmp_path):
    assert planner.main([str(tmp_path / "nope.yaml"), "--gpus", "8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "config file not found" in err[0]
