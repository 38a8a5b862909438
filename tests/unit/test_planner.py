"""The layout planner: parameter counts per rank (by hand-listed tensor shapes), memory, FLOPs,
ranking and the `aipo-mp plan` CLI. Pure arithmetic: no torch, no processes."""

from __future__ import annotations

import dataclasses
import json
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
    assert "KV/token KiB" in text and "<- chosen (smallest that fits)" in text
    assert text.rstrip().splitlines()[-1].startswith("why: tp=8")


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


# ---------------------------------------------------------------------------------------------
# Mixtures of experts
# ---------------------------------------------------------------------------------------------

MOE_MODELS = ["tiny_qwen3_moe", "tiny_mixtral", "qwen3_30b_a3b", "qwen3_235b_a22b", "mixtral_8x22b",
              "tiny_deepseek_v3", "deepseek_v3_671b"]

# tiny_qwen3_moe: h=128, ffn=256 (dense layer 1 only), 4 heads, 2 KV heads, head_dim 64, vocab 512,
# q/k norms, 4 experts of width 64, top-2. At tp=2 every layer has:
QWEN_MOE_TP2_ATTN = [
    (128,),  # input norm
    (256, 128),  # linear_qkv: (4 + 2*2) * 64 / 2 rows
    (64,), (64,),  # q and k norms (replicated)
    (128, 128),  # linear_proj: [h, 4*64/2]
    (128,),  # pre-MLP norm
]
QWEN_MOE_DENSE_MLP_TP2 = [(256, 128), (128, 128)]  # fc1 [2*256/2, h], fc2 [h, 256/2]
ROUTER = [(4, 128)]  # [E, h], replicated over TP and EP


def experts(local: int, width: int) -> list[tuple]:
    """`local` experts of FFN width `width`: fc1 [2*width, h] (gate and up), fc2 [h, width]."""
    return local * [(2 * width, 128), (128, width)]


def test_tiny_qwen3_moe_tp2_pp2_ep2_by_hand():
    arch = arch_of("tiny_qwen3_moe")
    counts = param_counts(arch, tp=2, pp=2, ep=2, etp=1)
    moe_layer = QWEN_MOE_TP2_ATTN + ROUTER + experts(2, 64)  # 4 experts / ep 2, full width with etp=1
    dense_layer = QWEN_MOE_TP2_ATTN + QWEN_MOE_DENSE_MLP_TP2
    first = [(256, 128)] + moe_layer + dense_layer  # embedding [512/2, h]; layers 0 (MoE) and 1 (dense)
    last = 2 * moe_layer + [(128,), (256, 128)]  # layers 2, 3; final norm, output layer
    assert counts.per_rank() == [numel(first), numel(last)]
    assert [s.moe_layers for s in counts.stages] == [1, 2]
    assert [s.experts for s in counts.stages] == [numel(experts(2, 64)), 2 * numel(experts(2, 64))]
    # etp=2 halves each expert's width on the rank; ep=1 keeps all 4 experts.
    etp2 = param_counts(arch, tp=2, pp=2, ep=1, etp=2)
    assert etp2.stages[1].experts == 2 * numel(experts(4, 32))
    assert etp2.model_total == counts.model_total == num_params(arch)


def test_tiny_mixtral_tp1_pp4_ep4_by_hand():
    arch = arch_of("tiny_mixtral")  # h=128, 4 heads, 2 KV heads, head_dim 48, 4 experts of width 96
    counts = param_counts(arch, tp=1, pp=4, ep=4)
    layer = [(128,), (384, 128), (128, 192), (128,)] + ROUTER + experts(1, 96)  # one expert per EP rank
    assert counts.per_rank() == [numel(layer) + 512 * 128, numel(layer), numel(layer), numel(layer) + 128 + 512 * 128]
    assert counts.per_layer == numel(layer)


def moe_layouts():
    for name in MOE_MODELS:
        arch = arch_of(name)
        for tp, pp, ep, etp in [(1, 1, 1, 1), (2, 2, 2, 1), (1, 4, 4, 1), (2, 1, 4, 2), (2, 2, 1, 2), (4, 2, 2, 4)]:
            if arch.num_layers % pp == 0 and arch.num_key_value_heads % tp == 0:
                yield name, tp, pp, ep, etp


@pytest.mark.parametrize("name,tp,pp,ep,etp", list(moe_layouts()))
def test_moe_shards_add_up_to_the_model(name, tp, pp, ep, etp):
    arch = arch_of(name)
    counts = param_counts(arch, tp, pp, 1, ep, etp)
    assert counts.model_total == num_params(arch)
    # Every MoE layer's experts are spread over exactly ep x etp ranks of each stage.
    moe_layers = arch.num_layers - len(arch.dense_layers)
    expert = 3 * arch.hidden_size * arch.moe_intermediate_size
    assert sum(s.experts for s in counts.stages) * ep * etp == moe_layers * arch.num_experts * expert


def test_expert_optimizer_shards_over_expert_dp_by_hand():
    """tiny_mixtral, bf16, distributed optimizer, one bucket per buffer (no overlap). Every tensor
    is a multiple of 64 elements, so megatron's buffers hold them unpadded; each buffer is padded
    to a multiple of lcm(DP, 128) (here already) and split evenly over its DP group."""
    arch = arch_of("tiny_mixtral")
    # Dense buffer per TP rank at tp=1: embedding + output [512, 128], final norm, and per layer two
    # norms, QKV [384, 128], proj [128, 192], router [4, 128].
    layer_dense = 2 * 128 + 384 * 128 + 128 * 192 + 4 * 128
    dense = 2 * 512 * 128 + 128 + 4 * layer_dense
    expert = 2 * 128 * 96 + 128 * 96  # one expert: fc1 [192, 128] + fc2 [128, 96]
    # ep=2 on 4 GPUs: DP 4 for the dense buffer, expert-DP 2 for the 2 local experts per layer.
    mem = memory_per_gpu(arch, Layout(1, 1, 1, 4, None, 2, 1), overlap_grad_reduce=False)
    b = mem.binding
    assert b.optimizer_by_rank == [12 * (dense / 4 + 4 * 2 * expert / 2)] * 4
    # tp=2 x ep=2 on 4 GPUs: the dense buffer of each TP rank over DP 2; the expert mesh is
    # etp 1 x ep 2 x expert-DP 2 (2 full-width experts per layer, their states split in two).
    dense_tp2 = 2 * 256 * 128 + 128 + 4 * (2 * 128 + 192 * 128 + 128 * 96 + 4 * 128)
    tp2 = memory_per_gpu(arch, Layout(2, 1, 1, 2, True, 2, 1), overlap_grad_reduce=False)
    assert tp2.binding.optimizer_by_rank == [12 * (dense_tp2 / 2 + 4 * 2 * expert / 2)] * 4
    # etp=2: etp 2 x ep 2 x expert-DP 1: each rank keeps all the states of its half-width experts.
    etp2 = memory_per_gpu(arch, Layout(2, 1, 1, 2, True, 2, 2), overlap_grad_reduce=False)
    assert etp2.binding.optimizer_by_rank == [12 * (dense_tp2 / 2 + 4 * 2 * expert / 2)] * 4
    assert etp2.binding.expert_weights == 2 * 4 * 2 * expert / 2  # bf16, 2 experts per layer at width 48
    # ep=4 x etp=1 at tp=1 on 4 GPUs: expert-DP 1 while the dense DP is 4.
    ep4 = memory_per_gpu(arch, Layout(1, 1, 1, 4, None, 4, 1), overlap_grad_reduce=False)
    assert ep4.binding.optimizer_by_rank == [12 * (dense / 4 + 4 * expert)] * 4
    # Frozen routers: no gradient, no optimizer state; still weights.
    frozen = memory_per_gpu(arch, Layout(1, 1, 1, 4, None, 2, 1), overlap_grad_reduce=False, freeze_router=True)
    assert frozen.binding.optimizer_by_rank == [12 * ((dense - 4 * 512) / 4 + 4 * expert)] * 4
    assert frozen.binding.grads == b.grads - 4 * 4 * 512 and frozen.binding.weights == b.weights


def test_moe_activation_bytes_by_hand():
    """tiny_qwen3_moe, local backend, bf16, s=128, tp=2 with SP: an MoE layer replaces the dense
    MLP's 5·e·f per token with its routing and expert terms for the 64 tokens of the rank."""
    arch = arch_of("tiny_qwen3_moe")
    s, t, e, h, k, E, width = 128, 2, 2, 128, 2, 4, 64
    dense = planner.layer_activation_bytes(arch, s, 1, t, True, "none", backend="local", moe=False)
    moe = planner.layer_activation_bytes(arch, s, 1, t, True, "none", backend="local", moe=True)
    f = 256
    router = k * 8 + k * 4  # top-k indices (int64), softmax over the top-k (fp32)
    permute = E * 1 + E * e + k * 8  # routing mask (bool) and probabilities, permutation index
    expert_rows = k * (e * h + e) + k * 6 * e * width  # dispatched rows + probability, MLP activations
    assert moe - dense == pytest.approx(s / t * (router + permute + expert_rows) - s * e * 5 * f / t)
    # etp=2: each rank sees the rows of both expert-TP ranks, at half the width.
    moe_etp2 = planner.layer_activation_bytes(arch, s, 1, t, True, "none", backend="local", moe=True, etp=2)
    assert moe_etp2 - moe == pytest.approx(s / t * k * (e * h + e))


def test_active_parameter_flops_by_hand():
    arch = arch_of("tiny_qwen3_moe")
    h, a, g, d, V, E, k, width, f = 128, 4, 2, 64, 512, 4, 2, 64, 256
    attn = h * (a + 2 * g) * d + a * d * h + 2 * d + 2 * h  # QKV, proj, q/k norms, two norms
    moe_mlp = E * h + k * 3 * h * width  # router + the k experts a token uses
    dense_mlp = 3 * h * f  # layer 1
    n_active = 4 * attn + 3 * moe_mlp + dense_mlp + h + V * h  # + final norm + output layer
    s = 256
    assert planner.forward_flops_per_token(arch, s) == 2 * n_active + 4 * 4 * a * d * (s / 2)
    # One GPU: no pipeline, no DP, no all-to-all: MFU is the efficiency, and the model FLOPs are
    # policy 3F + reference F per token from the active parameters.
    t1 = step_time(arch, Layout(1, 1, 1, 1), 1, "h100-80gb", s, 8, efficiency=0.4, gpus_per_node=8)
    assert t1.mfu == pytest.approx(0.4) and t1.a2a_s == 0
    assert t1.model_flops == pytest.approx(4 * (2 * n_active + 4 * 4 * a * d * s / 2) * 8 * s)


def test_all_to_all_volume_by_hand():
    arch = arch_of("tiny_qwen3_moe")  # 3 MoE layers, top-2, h=128
    s, e, k, h = 256, 2, 2, 128
    gpu = planner.GPUS["h100-80gb"]
    # ep=4 on 4 GPUs of one node (tp=1, dp=4): per forward of a micro-batch each GPU sends 3/4 of
    # its s·k token copies out (dispatch) and back (combine) in each of the 3 MoE layers.
    lay = Layout(1, 1, 1, 4, None, 4, 1)
    fwd = 3 * 2 * s * k * h * e * 3 / 4
    assert planner.moe_exchange_bytes(arch, lay, s) == (pytest.approx(fwd), 0)
    t = step_time(arch, lay, 4, gpu, s, 8, reference_forward=True, gpus_per_node=8)
    rows = 8 // 4  # per DP rank: forward + backward each, plus one reference forward per row
    assert t.a2a_bytes == pytest.approx((2 * rows + rows) * fwd)
    assert t.a2a_s == pytest.approx(t.a2a_bytes / (gpu.intra_node_gbs * 1e9))
    # The same layout spread over 4 nodes of one GPU: every EP peer is across the network.
    far = step_time(arch, lay, 4, gpu, s, 8, reference_forward=True, gpus_per_node=1)
    assert far.a2a_s == pytest.approx(t.a2a_bytes / (gpu.inter_node_gbs * 1e9))
    # tp=2, etp=2, ep=2 on 4 GPUs: T = s/2 tokens per rank; EP sends half; ETP gathers (etp-1)·T·k rows.
    lay2 = Layout(2, 1, 1, 2, True, 2, 2)
    ep_b, etp_b = planner.moe_exchange_bytes(arch, lay2, s)
    assert (ep_b, etp_b) == (pytest.approx(3 * 2 * (s / 2) * k * h * e / 2), pytest.approx(3 * 2 * (s / 2) * k * h * e))
    assert planner.moe_exchange_bytes(arch_of("tiny_llama"), Layout(1, 1, 1, 4), s) == (0, 0)


def test_moe_enumeration_rules():
    arch = arch_of("qwen3_235b_a22b")
    lays = planner.enumerate_layouts(arch, 64, 8, 32, 2560, etps=(1, 2))
    assert {l.ep for l in lays} >= {4, 8, 16, 32, 64}
    assert all(128 % l.ep == 0 and (l.tp * l.dp) % (l.ep * l.etp) == 0 and l.etp <= l.tp for l in lays)
    assert all(l.etp == l.tp for l in lays if l.ep == 1)  # without EP the experts split over the TP group
    assert all(l.tp in (1, 2, 4) for l in lays)  # tp divides the 4 KV heads
    assert planner.layout_problems(arch, Layout(4, 2, 1, 8, None, 1, 1))  # ep=1 with etp < tp
    assert planner.layout_problems(arch, Layout(2, 2, 1, 16, None, 4, 4))  # etp > tp
    assert planner.layout_problems(arch, Layout(4, 2, 1, 8, None, 3, 1))  # 3 does not divide 128 experts
    assert not planner.layout_problems(arch, Layout(4, 2, 1, 8, None, 32, 1))
    dense = planner.enumerate_layouts(arch_of("llama3_70b"), 64)
    assert dense and all((l.ep, l.etp) == (1, 1) for l in dense)


def test_235b_does_not_fit_where_it_cannot():
    """Whatever the layout, the GPUs together hold the bf16 weights, the fp32 gradients and the
    optimizer's fp32 master + 2 moments of every parameter at least once: 18 bytes a parameter.
    On 32 x H100-80GB that is 132 GB per GPU, more than 90 % of 79.6 GiB."""
    arch = arch_of("qwen3_235b_a22b")
    gpu = planner.GPUS["h100-80gb"]
    for gpus in (16, 32):
        assert 18 * num_params(arch) / gpus > 0.9 * gpu.memory_bytes
        rows = plan(arch, gpus, "h100-80gb", etps=(1, 2, 4))
        assert rows and not any(r.fits for r in rows)
        assert all(r.memory.total >= 18 * num_params(arch) / gpus for r in rows)
    assert plan(arch, 64, "h200-141gb")[0].fits


def test_moe_recipe_layouts_are_the_planners_top_row():
    from aipo_mp.validate import validate

    for recipe, gpu in (("aipo_qwen3_235b_a22b", "h100-80gb"), ("aipo_qwen3_235b_a22b_h200", "h200-141gb"),
                        ("aipo_qwen3_30b_a3b", "h100-80gb"), ("aipo_mixtral_8x22b", "h100-80gb")):
        cfg = load_config(ROOT / "configs" / "recipes" / f"{recipe}.yaml")
        gpus = cfg.cluster.nodes * cfg.cluster.nproc_per_node
        top = plan(cfg.model.arch, gpus, gpu)[0]
        par = cfg.parallel
        assert top.fits, recipe
        assert (top.layout.tp, top.layout.pp, top.layout.vpp, top.layout.ep, top.layout.etp) == \
            (par.tp, par.pp, par.vpp, par.ep, par.etp), recipe
        assert top.recompute == cfg.train.recompute, recipe
        cfg.model.path = None  # a placeholder path on this machine
        validate(cfg, world_size=gpus)


def test_moe_format_plan_and_dense_columns():
    moe_text = planner.format_plan(plan(arch_of("qwen3_30b_a3b"), 8, "h100-80gb"), top=3)
    header = next(l for l in moe_text.splitlines() if l.lstrip().startswith("#"))
    assert all(col in header.split() for col in ("ep", "etp", "experts", "a2a_s"))
    dense_text = planner.format_plan(plan(arch_of("llama3_8b"), 8, "h100-80gb"), top=3)
    dense_header = next(l for l in dense_text.splitlines() if l.lstrip().startswith("#"))
    assert not {"ep", "etp", "experts", "a2a_s"} & set(dense_header.split())


MOE_BIG = str(MODELS / "qwen3_235b_a22b.yaml")


def test_cli_prints_expert_parallel_layouts(capsys):
    from aipo_mp.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_code:
        cli_main(["plan", MOE_BIG, "--gpus", "64", "--gpu", "h100-80gb", "--top", "5"])
    out = capsys.readouterr().out
    assert exit_code.value.code in (0, None)
    lines = out.splitlines()
    assert "235.1B params, 22.2B active" in lines[0]
    assert "GFLOP/token forward" in out and "FLOPs from the active parameters" in out
    header = next(l for l in lines if l.lstrip().startswith("#"))
    cols = header.split()
    table = lines[lines.index(header) + 2:]
    rows = [l.split() for l in table[:next(i for i, l in enumerate(table) if not l.strip()[:1].isdigit())]]
    assert len(rows) == 5
    for row in rows:
        got = dict(zip(cols, row))
        assert int(got["ep"]) > 1 and 128 % int(got["ep"]) == 0 and int(got["etp"]) == 1
        assert float(got["peak"]) > float(got["weights"]) > float(got["experts"]) > 0
        assert float(got["step_s"]) > float(got["a2a_s"]) > 0 and got["MFU"].endswith("%")
    assert lines[-1].startswith("why: ") and " ep=" in lines[-1]


def test_cli_bad_etp(capsys):
    assert planner.main([MOE_BIG, "--gpus", "64", "--etp", "two"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --etp=two")


MOE_RECIPES = [("aipo_qwen3_235b_a22b", "qwen3_235b_a22b"), ("aipo_qwen3_235b_a22b_h200", "qwen3_235b_a22b"),
               ("aipo_qwen3_30b_a3b", "qwen3_30b_a3b"), ("aipo_mixtral_8x22b", "mixtral_8x22b")]


@pytest.mark.parametrize("recipe,model", MOE_RECIPES)
def test_moe_recipes_pass_check_and_dry_run(recipe, model, tmp_path, capsys, monkeypatch):
    """`aipo-mp check` at the recipe's world size and `aipo-mp run --dry-run` on Slurm, with the
    published config.json (written from the model config) and a tokenizer standing in for the
    checkpoint: training on every GPU of the cluster, one sampling engine per replica."""
    import json
    import os
    import shutil

    from aipo_mp.cli import main as cli_main
    from aipo_mp.models import hf_config_for
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    policy = tmp_path / "policy"
    shutil.copytree(build_tiny_tokenizer(tmp_path / "tok", vocab_size=512), policy)
    (policy / "config.json").write_text(json.dumps(hf_config_for(arch_of(model))))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    path = str(ROOT / "configs" / "recipes" / f"{recipe}.yaml")
    cfg = load_config(path)
    nodes, gpus = cfg.cluster.nodes, cfg.cluster.nodes * cfg.cluster.nproc_per_node
    overrides = [f"model.path={policy}", f"rounds.prompts={prompts}", f"output.dir={tmp_path / 'run'}"]

    def run(argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_code:
            cli_main(argv)
        out = capsys.readouterr()
        assert exit_code.value.code == 0, out.err
        return out.out

    out = run(["check", path, *overrides, "--world-size", str(gpus)])
    par = cfg.parallel
    assert out.startswith(f"ok: {arch_of(model).family}") and f"ep={par.ep} etp={par.etp}" in out
    plan_json = json.loads(run(["run", path, *overrides, "--launcher", "slurm", "--dry-run", "--nodes", str(nodes),
                                "--gpus-per-node", str(cfg.cluster.nproc_per_node), "--json"]))
    stages = {s["name"]: s for s in plan_json["stages"]}
    assert (stages["train"]["ntasks"], stages["train"]["nodes"]) == (gpus, nodes)
    s = cfg.sampling
    assert (stages["sample"]["engines"], stages["sample"]["ntasks"], stages["sample"]["gpus_per_task"]) == \
        (s.replicas, s.replicas, s.tensor_parallel * s.pipeline_parallel * s.data_parallel)


@pytest.mark.parametrize("script,recipe", [("aipo_235b_a22b.sh", "aipo_qwen3_235b_a22b"),
                                           ("aipo_30b_a3b.sh", "aipo_qwen3_30b_a3b"),
                                           ("aipo_8x22b.sh", "aipo_mixtral_8x22b")])
def test_moe_slurm_scripts_ask_for_their_recipes_nodes(script, recipe):
    import re
    import subprocess

    path = ROOT / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    assert f"RECIPE=${{RECIPE:-configs/recipes/{recipe}.yaml}}" in text
    cfg = load_config(ROOT / "configs" / "recipes" / f"{recipe}.yaml")
    assert int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1)) == cfg.cluster.nodes
    assert int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1)) == cfg.cluster.nproc_per_node


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3: latent attention, a shared expert, dense first layers
# ---------------------------------------------------------------------------------------------

# tiny_deepseek_v3: h=128, ffn=256 (layer 0 dense), 4 heads, q_lora 64, kv_lora 512, qk 32 + RoPE
# 64, v 32, vocab 512, 8 experts of width 32, top-2, a shared expert of width 32. At tp=2:
DSV3_TP2_ATTN = [
    (128,),  # input norm
    (128, 64),  # linear_proj: [h, 4/2 heads * v 32]
    (32, 128),  # linear_q_down_proj: [q_lora 64 / 2, h] (column-parallel latent)
    (192, 64),  # linear_q_up_proj: [2 heads * (32 + 64), q_lora]
    (288, 128),  # linear_kv_down_proj: [(512 + 64) / 2, h]
    (128, 512),  # linear_kv_up_proj: [2 heads * (32 + 32), kv_lora]
    (64,), (512,),  # q and kv latent norms (replicated)
    (128,),  # pre-MLP norm
]
DSV3_DENSE_MLP_TP2 = [(256, 128), (128, 128)]
DSV3_SHARED_TP2 = [(32, 128), (128, 16)]  # shared expert fc1 [2*32/2, h], fc2 [h, 32/2]


def test_tiny_deepseek_v3_tp2_pp3_ep2_by_hand():
    arch = arch_of("tiny_deepseek_v3")
    counts = param_counts(arch, tp=2, pp=3, ep=2, etp=1)
    moe_layer = DSV3_TP2_ATTN + [(8, 128)] + 4 * [(64, 128), (128, 32)] + DSV3_SHARED_TP2  # router, 8/2 experts
    first = [(256, 128)] + DSV3_TP2_ATTN + DSV3_DENSE_MLP_TP2
    last = moe_layer + [(128,), (256, 128)]
    assert counts.per_rank() == [numel(first), numel(moe_layer), numel(last)]
    assert counts.per_layer == numel(moe_layer)
    assert counts.model_total == num_params(arch)
    # megatron's registration order lists the same tensors (the optimizer's buffer layout).
    for stage, shapes in enumerate([first, moe_layer, last]):
        entries = planner.chunk_params(arch, 2, 3, 1, stage, 0, ep=2)
        assert sorted(e.numel for e in entries) == sorted(math.prod(s) for s in shapes)
    assert not planner.layout_problems(arch, Layout(2, 1, 1, 2, None, 2, 1))
    odd = dataclasses.replace(arch, q_lora_rank=66)
    assert any("q_lora_rank (66)" in p for p in planner.layout_problems(odd, Layout(4, 1, 1, 1, None, 1, 4)))
    assert not planner.layout_problems(odd, Layout(2, 1, 1, 2, None, 2, 1))


def test_deepseek_v3_activation_flops_and_kv_by_hand():
    arch = arch_of("tiny_deepseek_v3")
    e, s = 2, 64
    # The local spec's norms keep an fp32 input and a bf16 normalised copy: 4 + 2 bytes per element.
    replicated = 2 * 6 * 128 + 2 * e * 128 + (64 + 512) * (6 + e)  # hidden norms + GEMM inputs + latents
    attn = e * 4 * (2 * 96 + 2 * 32) + 4 * 4  # q, k (nope + rope), v, output; fp32 log-sum-exp per head
    dense = replicated + attn + e * 5 * 256
    assert planner.layer_activation_bytes(arch, s, tp=1, backend="te", moe=False) == s * dense
    assert planner.layer_activation_bytes(arch, s, tp=2, sp=True, backend="local", moe=False) == \
        s * (replicated / 2 + (attn + e * 5 * 256) / 2)
    moe = replicated + attn + e * 5 * 32 + planner.moe_bytes_per_token(arch, "bf16")  # shared expert + experts
    assert planner.layer_activation_bytes(arch, s, tp=1, backend="te", moe=True) == s * moe
    # Attention FLOPs: q·k over 32 + 64 dims and p·v over 32, per sequence of s/2 tokens.
    attn_flops = 2 * 3 * 4 * (96 + 32) * (s / 2)
    assert planner.forward_flops_per_token(arch, s) == 2 * planner.compute_params(arch) + attn_flops
    # vLLM caches the 512 latent + 64 RoPE key per layer, whole on every TP rank.
    assert planner.sampling_memory(arch, "h100-80gb", 2).kv_bytes_per_token == 2 * 3 * (512 + 64)


def test_deepseek_v3_671b_plan():
    """671B: no pipeline depth but 1 (61 layers, no uneven stages); 8 H200 nodes cannot hold the
    training state (18 bytes a parameter over 64 GPUs), 16 nodes fit at tp 8 x ep 128; no vLLM
    engine of one node holds the bf16 weights."""
    arch = arch_of("deepseek_v3_671b")
    assert 18 * num_params(arch) / 64 > 0.9 * planner.GPUS["h200-141gb"].memory_bytes
    assert not any(r.fits for r in plan(arch, 64, "h200-141gb"))
    rows = plan(arch, 128, "h200-141gb")
    assert rows[0].fits and {r.layout.pp for r in rows} == {1}
    assert all(planner.sampling_memory(arch, "h200-141gb", t).kv_tokens == 0 for t in (1, 2, 4, 8))


def test_deepseek_v3_recipe_is_the_planners_top_row_and_samples_on_two_node_engines(tmp_path, capsys, monkeypatch):
    """configs/recipes/aipo_deepseek_v3.yaml trains on the planner's top layout for its 16 H200
    nodes and samples with the planner's engine: DP x EP over 2 nodes (no one-node engine holds the
    bf16 weights); `aipo-mp check` passes it, and one engine more than the nodes hold is refused."""
    import json
    import os
    import shutil

    from aipo_mp.cli import main as cli_main
    from aipo_mp.models import hf_config_for
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    path = ROOT / "configs" / "recipes" / "aipo_deepseek_v3.yaml"
    cfg = load_config(path)
    gpus = cfg.cluster.nodes * cfg.cluster.nproc_per_node
    top = plan(cfg.model.arch, gpus, "h200-141gb")[0]
    par = cfg.parallel
    assert top.fits and top.recompute == cfg.train.recompute
    assert (top.layout.tp, top.layout.pp, top.layout.vpp, top.layout.ep, top.layout.etp) == \
        (par.tp, par.pp, par.vpp, par.ep, par.etp)
    s = cfg.sampling
    chosen = planner.choose_engine(planner.engine_options(cfg.model.arch, "h200-141gb", 8))
    assert (s.tensor_parallel, s.pipeline_parallel, s.data_parallel, s.expert_parallel) == \
        (chosen.tp, chosen.pp, chosen.dp, True)
    assert chosen.nodes_per_engine == 2 and s.replicas * chosen.nodes_per_engine == cfg.cluster.nodes
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    policy = tmp_path / "policy"
    shutil.copytree(build_tiny_tokenizer(tmp_path / "tok", vocab_size=512), policy)
    (policy / "config.json").write_text(json.dumps(hf_config_for(cfg.model.arch)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    args = ["check", str(path), f"model.path={policy}", f"rounds.prompts={prompts}", f"output.dir={tmp_path / 'run'}",
            "--world-size", str(gpus)]
    for extra, code in (([], 0), (["sampling.replicas=9"], 2)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_code:
            cli_main(args + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_code.value.code == code, err
    assert err == ["error: sampling.replicas=9 engines x 2 nodes each (sampling.tensor_parallel x pipeline_parallel x "
                   "data_parallel = 1 x 1 x 16) need 18 nodes; the allocation has 16: use sampling.replicas <= 8 or "
                   "more nodes"]


# ---------------------------------------------------------------------------------------------
# Sampling engines: the layout `aipo-mp plan` chooses next to the training layout
# ---------------------------------------------------------------------------------------------


def test_405b_bf16_on_h100_needs_a_two_node_engine():
    """Hand-worked: 405.9B params x 2 bytes = 756 GiB. At TP 8 a GPU holds 94.5 GiB of weights, more
    than 90% of 79.6 GiB; at TP 8 x PP 2 it holds ~47.3 GiB (plus its stage's embedding share) and
    the batch's KV cache: 160 sequences (5 x 32 prompts) x 2560 tokens x 63 layers x 1 KV head of
    128 x K,V x 2 bytes = 12.3 GiB, within 0.9 x 79.6 - 47.3 - 2 GiB."""
    arch = arch_of("llama3_1_405b")
    gib = planner.GiB
    assert 755 < 2 * num_params(arch) / gib < 757
    options = planner.engine_options(arch, "h100-80gb", 8)
    by_shape = {(o.tp, o.pp, o.dp): o for o in options}
    tp8, tp8pp2 = by_shape[(8, 1, 1)], by_shape[(8, 2, 1)]
    budget = 0.9 * planner.GPUS["h100-80gb"].memory_bytes
    assert tp8.weights > budget and not tp8.fits
    assert abs(tp8pp2.weights - 2 * num_params(arch) / 16) / tp8pp2.weights < 0.01
    assert tp8pp2.kv_bytes_per_token == 2 * 2 * 63 * 1 * 128
    assert tp8pp2.kv_needed == 160 * 2560 * 2 * 2 * 63 * 128
    assert tp8pp2.weights + planner.VLLM_OVERHEAD + tp8pp2.kv_needed <= budget
    chosen = planner.choose_engine(options)
    assert (chosen.tp, chosen.pp, chosen.dp, chosen.gpus, chosen.nodes_per_engine) == (8, 2, 1, 16, 2)
    assert all(not o.fits for o in options if o.gpus < 16)
    h200 = planner.choose_engine(planner.engine_options(arch, "h200-141gb", 8))
    assert (h200.tp, h200.pp, h200.gpus) == (8, 1, 8)  # 94.5 + 2 + 24.6 GiB <= 0.9 x 140.4 GiB


def test_moe_engines_split_experts_over_dp_x_tp():
    """DeepSeek-V3 at TP 1 x DP 16 (EP 16): each GPU holds every non-expert weight and 1/16 of
    the experts (58 MoE layers x 256 experts x 3 x 7168 x 2048), and the latent KV cache
    (kv_lora_rank 512 + RoPE key 64 per layer, 61 layers, bf16) of its 160 / 16 sequences."""
    arch = arch_of("deepseek_v3_671b")
    experts = (arch.num_layers - len(arch.dense_layers)) * arch.num_experts * 3 * arch.hidden_size * \
        arch.moe_intermediate_size
    assert experts == 58 * 256 * 3 * 7168 * 2048
    o = planner.engine_option(arch, "h200-141gb", 8, planner.SamplingSettings(), 1, 1, 16)
    assert (o.ep, o.gpus, o.nodes_per_engine, o.sequences_per_gpu) == (16, 16, 2, 10)
    assert abs(o.weights - 2 * (num_params(arch) - experts + experts / 16)) / o.weights < 1e-3
    assert o.kv_bytes_per_token == 2 * 61 * (512 + 64)
    assert o.kv_needed == 10 * 2560 * 2 * 61 * 576


ENGINE_RECIPES = [("aipo_llama3_1_405b", "h100-80gb"), ("aipo_llama3_1_405b_h200", "h200-141gb"),
                  ("aipo_qwen3_235b_a22b", "h100-80gb"), ("aipo_qwen3_235b_a22b_h200", "h200-141gb"),
                  ("aipo_mixtral_8x22b", "h100-80gb"), ("aipo_deepseek_v3", "h200-141gb")]


@pytest.mark.parametrize("recipe,gpu", ENGINE_RECIPES)
def test_recipes_sample_on_the_planners_engine(recipe, gpu):
    """Each large recipe's sampling layout is the engine `aipo-mp plan` chooses for its GPU (expert
    parallel exactly for MoE), and its engines fill the allocation's nodes."""
    cfg = load_config(ROOT / "configs" / "recipes" / f"{recipe}.yaml")
    ss = planner.sampling_settings(cfg, 32)
    chosen = planner.choose_engine(planner.engine_options(cfg.model.arch, gpu, cfg.cluster.nproc_per_node, ss))
    s = cfg.sampling
    assert (s.tensor_parallel, s.pipeline_parallel, s.data_parallel) == (chosen.tp, chosen.pp, chosen.dp)
    assert s.expert_parallel == bool(cfg.model.arch.num_experts)
    assert s.replicas * chosen.gpus == cfg.cluster.nodes * cfg.cluster.nproc_per_node


def test_plan_json_gives_the_sampling_engine_next_to_the_training_rows(capsys):
    recipe = str(ROOT / "configs" / "recipes" / "aipo_llama3_1_405b.yaml")
    assert planner.main([recipe, "--gpus", "224", "--top", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    train = out["training"][0]
    assert (train["tp"], train["pp"], train["dp"], train["fits"]) == (8, 14, 2, True)
    chosen = out["sampling"]["chosen"]
    assert (chosen["tp"], chosen["pp"], chosen["gpus"], chosen["nodes_per_engine"]) == (8, 2, 16, 2)
    assert out["sampling"]["recipe"] == chosen and out["sampling"]["sequences"] == 160
    assert chosen["weights_gib"] + 2 + chosen["kv_needed_gib"] <= chosen["budget_gib"]
    assert planner.main([recipe, "--gpus", "224", "--top", "2"]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if "<- chosen" in line)
    assert line.split()[:6] == ["TP", "8", "x", "PP", "2", "16"]
    assert planner.main([recipe, "--gpus", "224", "--prompts-per-engine", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --prompts-per-engine=0: must be >= 1")
