"""Mixture-of-experts conversion (Qwen3-MoE with a dense layer, Mixtral, DeepSeek-V3): HF -> Megatron at
EP=2 x TP=2 (ETP=2, 4 ranks) -> HF is bit-exact for both families and both HF expert layouts
(per-expert tensors, and transformers 5's fused 3-D experts written by
`save_pretrained(save_original_format=False)`; the output is always per-expert); each rank reads
only its share; the checkpoint reads back at EP=1 with transformers' logits; peak memory per
rank does not grow with the number of experts (32 vs 4); every broken expert tensor is one
error line naming it. DeepSeek-V3 (latent attention, expert bias, shared expert) round-trips
bit-exact from bf16 (the expert bias stays fp32), and its block-scaled FP8 release format converts
to the bf16 weights transformers' dequantization gives; the multi-token-prediction layer is dropped.
gpt-oss (fused, gate/up-interleaved experts with biases) round-trips bit-exact at TP2 x EP2 x PP2
into the same fused layout, which transformers loads with the source's logits; its MXFP4 release
format converts to the bf16 experts transformers' dequantization gives.

One 4-rank launch runs every multi-rank conversion (tests/convert_worker.py); the single-rank
ones run in this process."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from aipo_mp.training import manifest
from tests.conftest import MOE_MODELS, tiny_arch
from tests.e2e.test_checkpoint_tools import (
    TOL,
    assert_same_weights,
    assert_user_error,
    max_diff,
    ok,
    rewrite_weights,
    run_cli,
    run_main,
)

LAYOUT = ["--tp", "2", "--ep", "2", "--etp", "2"]
# gpt-oss: megatron takes expert biases only at expert-TP 1, so TP2 x EP2 with PP2 fills the 4 ranks.
GPT_OSS_LAYOUT = ["--tp", "2", "--ep", "2", "--etp", "1", "--pp", "2"]
MEMORY_EXPERTS = (4, 32)
MEMORY_RATIO = 1.2
# glibc's malloc otherwise raises its mmap threshold as blocks are freed and keeps later tensors
# in its heap, which outlives them: a command run after another would reuse (and hide in) the
# memory the first one left resident. Fixed, every tensor's pages go back to the system when it
# is freed, so each command's peak is its own.
FRESH_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def write_random_moe(out: Path, experts: int, hidden: int = 1024, ffn: int = 1024, layers: int = 2) -> int:
    """A bf16 Qwen3-MoE HF directory whose experts dominate its bytes (names and shapes from the
    family's table; one safetensors file per layer). Values are cheap, distinct per tensor: this
    model only measures memory. Returns the bytes of its weights."""
    from safetensors.torch import save_file

    from aipo_mp.config import ModelArch
    from aipo_mp.convert.common import expected_hf_shapes
    from aipo_mp.models import get_family, hf_config_for

    arch = ModelArch(family="qwen3_moe", hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512, qk_norm=True,
                     num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=ffn, norm_topk_prob=True,
                     tie_embeddings=False, max_position_embeddings=1024)
    names = get_family("qwen3_moe").hf_names(arch)
    shapes = expected_hf_shapes(arch, names)
    files: dict[str, list[str]] = {}
    for n in names:
        files.setdefault(n.split(".")[2] if n.startswith("model.layers.") else "other", []).append(n)
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, (part, group) in enumerate(files.items()):
        tensors = {}
        for j, n in enumerate(group):
            shape = shapes.get(n, (arch.head_dim,) if "_norm" in n else (hidden,))
            numel = torch.Size(shape).numel()
            tensors[n] = ((torch.arange(numel, dtype=torch.float32) * (k + 1) + j) % 251 / 1000).to(torch.bfloat16).view(shape)
            total += numel * 2
        fname = f"model-{part}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    cfg = hf_config_for(arch)
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    return total


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert_moe")


@pytest.fixture(scope="module")
def sources(tiny_hf_dirs, work) -> dict:
    """(family, "per_expert" | "fused") -> HF directory of the same weights (seed 11, as the tiny
    per-expert fixture)."""
    from aipo_mp.testing.hf_build import hf_model_from_arch

    out = {}
    for fam in MOE_MODELS:
        out[fam, "per_expert"] = tiny_hf_dirs[fam]
        fused = work / f"{fam}_fused"
        hf_model_from_arch(tiny_arch(fam), seed=11).save_pretrained(fused, save_original_format=False)
        out[fam, "fused"] = fused
    bf16 = work / "deepseek_v3_bf16"
    hf_model_from_arch(tiny_arch("deepseek_v3"), seed=11, dtype=torch.bfloat16).save_pretrained(bf16)
    out["deepseek_v3", "bf16"] = bf16
    out["deepseek_v3", "fp8"] = write_fp8_copy(bf16, work / "deepseek_v3_fp8")
    gpt_oss = work / "gpt_oss_bf16"  # transformers writes gpt-oss's experts fused, gate/up interleaved
    hf_model_from_arch(tiny_arch("gpt_oss"), seed=11, dtype=torch.bfloat16).save_pretrained(gpt_oss)
    out["gpt_oss", "bf16"] = gpt_oss
    out["gpt_oss", "mxfp4"] = write_mxfp4_copy(gpt_oss, work / "gpt_oss_mxfp4")
    return out


def write_mxfp4_copy(src: Path, dst: Path) -> Path:
    """`src` as the gpt-oss releases store it: the fused gate_up_proj and down_proj as MXFP4
    `_blocks` + `_scales`, everything else (the biases included) unchanged."""
    from aipo_mp.convert.quantized import quantize_mxfp4

    def to_mxfp4(tensors: dict) -> dict:
        out = {}
        for name, t in tensors.items():
            if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
                out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(t)
            else:
                out[name] = t
        return out

    rewrite_weights(src, dst, to_mxfp4)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def write_fp8_copy(src: Path, dst: Path) -> Path:
    """`src` as the DeepSeek releases store it: every projection weight float8_e4m3fn with fp32
    scales per 128 x 128 block (partial blocks where 128 does not divide), the rest unchanged."""
    from aipo_mp.convert.quantized import quantize

    def to_fp8(tensors: dict) -> dict:
        out = {}
        for name, t in tensors.items():
            if name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight"):
                out[name], out[name + "_scale_inv"] = quantize(t)
            else:
                out[name] = t
        return out

    rewrite_weights(src, dst, to_fp8)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def ep2(sources, work) -> dict:
    """One 4-rank launch: every source to Megatron at EP=2 x TP=2 (ETP=2) and back, and the
    memory models (4 and 32 experts) both ways at the same layout, each with its --report."""
    from tests.launch import run_ranks

    for e in MEMORY_EXPERTS:
        write_random_moe(work / f"mem{e}", e)
    commands, out = [], {}
    for (fam, layout), src in sources.items():
        mc, back = work / f"mc_{fam}_{layout}", work / f"back_{fam}_{layout}"
        # DeepSeek: bf16 weights and an fp32 expert bias (mixed): the checkpoint's dtype is asked for.
        dtype = ["--dtype", "bf16"] if fam == "deepseek_v3" else []
        layout_args = GPT_OSS_LAYOUT if fam == "gpt_oss" else LAYOUT
        commands += [["hf-to-mcore", "--hf", str(src), "--out", str(mc), *layout_args, *dtype,
                      "--report", str(mc) + ".json"],
                     ["mcore-to-hf", "--ckpt", str(mc), "--out", str(back), "--max-shard-size", "500KB",
                      "--report", str(back) + ".json"]]
        out[fam, layout] = (mc, back)
    for e in MEMORY_EXPERTS:
        mc, back = work / f"mem{e}_mc4", work / f"mem{e}_back4"
        commands += [["hf-to-mcore", "--hf", str(work / f"mem{e}"), "--out", str(mc), *LAYOUT,
                      "--report", str(work / f"mem{e}_to_mcore_4ranks.json")],
                     ["mcore-to-hf", "--ckpt", str(mc), "--out", str(back),
                      "--report", str(work / f"mem{e}_to_hf_4ranks.json")]]
    run_ranks(4, "tests.convert_worker", [json.dumps(commands)], env_extra=FRESH_MALLOC)
    for e in MEMORY_EXPERTS:  # only their reports are needed
        shutil.rmtree(work / f"mem{e}_mc4")
        shutil.rmtree(work / f"mem{e}_back4")
    return out


def report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# HF -> Megatron (EP=2 x TP=2) -> HF
# ---------------------------------------------------------------------------------------------


@pytest.mark.dist
def test_ep2_tp2_round_trip_is_bit_exact_from_both_expert_layouts(sources, ep2):
    from aipo_mp.convert.hf_io import HFWeights
    from aipo_mp.convert.tensor_io import DistCheckpointReader

    for fam in MOE_MODELS:
        arch = tiny_arch(fam)
        # transformers really wrote the fused layout, and the reader presents it per expert.
        fused = HFWeights(sources[fam, "fused"])
        assert "model.layers.0.mlp.experts.gate_up_proj" in fused.files and fused.virtual
        assert_same_weights(sources[fam, "per_expert"], sources[fam, "fused"])
        for layout in ("per_expert", "fused"):
            mc, back = ep2[fam, layout]
            n = assert_same_weights(sources[fam, "per_expert"], back)
            assert not HFWeights(back).virtual, "the export must be per-expert tensors"
            assert n == len(HFWeights(sources[fam, "per_expert"]).names())
            meta = json.loads((mc / "aipo_checkpoint.json").read_text())
            assert meta["layout"] == {"tp": 2, "pp": 1, "vpp": 1, "ep": 2, "etp": 2}
            # Keys as megatron's SequentialMLP saves them: a key per layer, experts stacked first.
            reader = DistCheckpointReader(mc / "model")
            e, i, h = arch.num_experts, arch.moe_intermediate_size, arch.hidden_size
            assert reader.global_shape("decoder.layers.0.mlp.experts.experts.linear_fc1.weight") == (e, 2 * i, h)
            assert reader.global_shape("decoder.layers.0.mlp.experts.experts.linear_fc2.weight") == (e, h, i)
            # Each rank read only its share of the source: every byte once over the 4 ranks.
            ranks = report(str(mc) + ".json")["ranks"]
            total = sum(r["bytes_read"] for r in ranks)
            assert total == ranks[0]["model_bytes"], (total, ranks[0]["model_bytes"])
            assert max(r["bytes_read"] for r in ranks) < 0.5 * total, [r["bytes_read"] for r in ranks]
            assert sorted((r["ep_rank"], r["etp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.dist
def test_deepseek_v3_round_trip_bf16_bit_exact_and_fp8_as_transformers_dequantizes(sources, ep2):
    from aipo_mp.convert.hf_io import HFWeights
    from aipo_mp.convert.quantized import dequantize
    from aipo_mp.convert.tensor_io import DistCheckpointReader

    src = sources["deepseek_v3", "bf16"]
    mc, back = ep2["deepseek_v3", "bf16"]
    assert assert_same_weights(src, back) == len(HFWeights(src).names())
    assert HFWeights(back).dtype("model.layers.1.mlp.gate.e_score_correction_bias") == "fp32"
    reader = DistCheckpointReader(mc / "model")
    assert reader.global_shape("decoder.layers.1.mlp.router.expert_bias") == (8,)
    assert reader.global_shape("decoder.layers.1.mlp.shared_experts.linear_fc1.weight") == (64, 128)
    cfg = json.loads((back / "config.json").read_text())
    assert (cfg["topk_method"], cfg["scoring_func"], cfg["num_nextn_predict_layers"]) == ("noaux_tc", "sigmoid", 0)

    # FP8: the projections come back as their dequantized bf16 values, the rest unchanged.
    fp8_src, (_, fp8_back) = sources["deepseek_v3", "fp8"], ep2["deepseek_v3", "fp8"]
    from safetensors import safe_open

    with safe_open(str(fp8_src / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    got, quantized = HFWeights(fp8_back), 0
    assert sorted(got.names()) == sorted(HFWeights(src).names())
    for name in got.names():
        if name + "_scale_inv" in stored:
            want = dequantize(stored[name], stored[name + "_scale_inv"], (128, 128))
            quantized += 1
        else:
            want = stored[name]
        assert torch.equal(got.get(name), want), name
    assert quantized == 3 * 5 + 2 * (8 * 3 + 3) + 3  # 5 attention projections x 3 layers, experts + shared x 2, dense MLP
    assert "quantization_config" not in json.loads((fp8_back / "config.json").read_text())


def stored_tensors(directory: Path) -> dict:
    """Every tensor of an HF directory under its stored name (fused experts stay fused)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.dist
def test_gpt_oss_round_trip_writes_the_fused_layout_and_mxfp4_converts_as_transformers_dequantizes(sources, ep2):
    """gpt-oss at TP2 x EP2 x PP2 (expert-TP 1): the export holds exactly the source's stored
    tensors (fused, gate/up-interleaved experts and their biases), bit for bit, and transformers
    loads it with the source's logits; each rank read only its share. An MXFP4 copy converts to
    the bf16 experts transformers' own dequantization gives, and its export drops
    quantization_config."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from aipo_mp.convert.tensor_io import DistCheckpointReader

    arch, src = tiny_arch("gpt_oss"), sources["gpt_oss", "bf16"]
    mc, back = ep2["gpt_oss", "bf16"]
    want, got = stored_tensors(src), stored_tensors(back)
    assert "model.layers.1.mlp.experts.gate_up_proj" in want and sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    meta = json.loads((mc / "aipo_checkpoint.json").read_text())
    assert meta["layout"] == {"tp": 2, "pp": 2, "vpp": 1, "ep": 2, "etp": 1}
    e, i, h = arch.num_experts, arch.moe_intermediate_size, arch.hidden_size
    reader = DistCheckpointReader(mc / "model")
    assert reader.global_shape("decoder.layers.1.mlp.experts.experts.linear_fc1.weight") == (e, 2 * i, h)
    assert reader.global_shape("decoder.layers.1.mlp.experts.experts.linear_fc2.weight") == (e, h, i)
    # The sinks are split over TP by heads: stored whole (saved as replicated, TP rank 0's half only).
    assert reader.global_shape("decoder.layers.0.self_attention.core_attention.softmax_offset") == \
        (arch.num_attention_heads,)
    ranks = report(str(mc) + ".json")["ranks"]
    assert sum(r["bytes_read"] for r in ranks) == ranks[0]["model_bytes"]
    assert max(r["bytes_read"] for r in ranks) < 0.5 * ranks[0]["model_bytes"], [r["bytes_read"] for r in ranks]
    ids = torch.randint(0, arch.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for d in (src, back):
        model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
        assert not any(info.values()), (d, info)
        with torch.no_grad():
            logits[d] = model(ids).logits
    assert torch.equal(logits[src], logits[back])

    quantized, (_, mx_back) = stored_tensors(sources["gpt_oss", "mxfp4"]), ep2["gpt_oss", "mxfp4"]
    got, dequantized = stored_tensors(mx_back), 0
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        if name + "_blocks" in quantized:
            expect = convert_moe_packed_tensors(quantized[name + "_blocks"].clone(), quantized[name + "_scales"].clone())
            dequantized += 1
        else:
            expect = quantized[name]
        assert t.dtype == expect.dtype == torch.bfloat16 and torch.equal(t, expect), name
    assert dequantized == 2 * arch.num_layers
    assert "quantization_config" not in json.loads((mx_back / "config.json").read_text())


def test_fp8_block_dequantization_equals_transformers():
    """Whole 128 x 128 blocks: transformers' own FP8 dequantization, bit for bit. Partial blocks
    (which that function refuses): each block's values times its scale, rounded once to bf16.
    A run of rows reads the same values as the whole tensor."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from aipo_mp.convert.quantized import dequantize, quantize

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 384, generator=g) * 0.05).to(torch.bfloat16)
    q, s = quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float32
    ours = dequantize(q, s, (128, 128))
    assert torch.equal(ours, Fp8Dequantize(None)._dequantize_one(q, s, torch.bfloat16))
    assert (ours.float() - w.float()).abs().max() <= 0.07 * w.float().abs().max()  # e4m3: 3 mantissa bits
    w2 = torch.randn(200, 300, generator=g).to(torch.bfloat16)
    q2, s2 = quantize(w2)
    assert s2.shape == (2, 3)
    want = torch.empty(200, 300, dtype=torch.bfloat16)
    for i in range(2):
        for j in range(3):
            block = q2[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            want[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block.float() * s2[i, j]).to(torch.bfloat16)
    assert torch.equal(dequantize(q2, s2, (128, 128)), want)
    assert torch.equal(dequantize(q2[100:170], s2, (128, 128), first_row=100), want[100:170])


def test_deepseek_v3_fp8_and_mtp_sources_are_checked_by_name(sources, work):
    """An FP8 tensor without its scale, or a scale without its weight, is one line naming it; the
    multi-token-prediction layer (model.layers.3.*) is dropped with a note, left out of an export,
    and restored bit for bit by `mcore-to-hf --restore-dropped SOURCE` (a full checkpoint)."""
    from aipo_mp.convert.hf_io import HFWeights

    fp8 = sources["deepseek_v3", "fp8"]
    scale = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    no_scale = rewrite_weights(fp8, work / "fp8_no_scale", lambda t: {k: v for k, v in t.items() if k != scale})
    assert_user_error(run_main("inspect", no_scale), "FP8 tensor model.layers.1.self_attn.o_proj.weight has no "
                                                    "model.layers.1.self_attn.o_proj.weight_scale_inv")
    orphan = rewrite_weights(fp8, work / "fp8_orphan", lambda t: {**t, "model.layers.0.x_proj.weight_scale_inv":
                                                                  torch.ones(1, 1)})
    assert_user_error(run_main("inspect", orphan), "holds model.layers.0.x_proj.weight_scale_inv but not the weight")
    g = torch.Generator().manual_seed(3)
    mtp_tensors = {"model.layers.3.eh_proj.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16),
                   "model.layers.3.mlp.experts.0.up_proj.weight": torch.randn(32, 128, generator=g).to(torch.bfloat16)}
    mtp = rewrite_weights(sources["deepseek_v3", "bf16"], work / "with_mtp", lambda t: {**t, **mtp_tensors})
    config = json.loads((mtp / "config.json").read_text())
    (mtp / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    code, _, err = run_main("inspect", mtp)
    assert code == 0 and "note:" in err and "2 tensors not imported" in err and "multi-token-prediction" in err, err
    # Export drops it too, unless a full checkpoint is asked for: then it comes back from the source unchanged.
    mc, plain, full = work / "mtp_mc", work / "mtp_plain", work / "mtp_full"
    ok(run_main("hf-to-mcore", "--hf", mtp, "--out", mc, "--dtype", "bf16"))
    ok(run_main("mcore-to-hf", "--ckpt", mc, "--out", plain))
    assert json.loads((plain / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert not set(mtp_tensors) & set(HFWeights(plain).names())
    ok(run_main("mcore-to-hf", "--ckpt", mc, "--out", full, "--restore-dropped", mtp))
    assert json.loads((full / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert assert_same_weights(mtp, full) == len(HFWeights(plain).names()) + 2  # every tensor, bit for bit
    assert_user_error(run_main("mcore-to-hf", "--ckpt", mc, "--out", work / "mtp_none", "--restore-dropped",
                               sources["deepseek_v3", "bf16"]), "holds no tensors that import drops",
                      work / "mtp_none")
    extra = rewrite_weights(sources["deepseek_v3", "bf16"], work / "with_extra", lambda t: {
        **t, "model.layers.2.mlp.extra.weight": torch.zeros(2, 2)})
    assert_user_error(run_main("inspect", extra), "unexpected tensors model.layers.2.mlp.extra.weight")


@pytest.mark.dist
def test_ep2_tp2_checkpoints_read_back_at_ep1_with_hf_logits(sources, ep2):
    """The dist checkpoint written at EP=2 x TP=2 loads at EP=1 x TP=1 (megatron's loader, the
    trainer's) and gives transformers' logits."""
    for fam, layout in (("qwen3_moe", "per_expert"), ("mixtral", "fused")):
        out = ok(run_main("verify", "--hf", sources[fam, "per_expert"], "--ckpt", ep2[fam, layout][0], "--tp", "1"))
        assert "ep=1 etp=1" in out and max_diff(out) <= TOL, out


@pytest.mark.dist
def test_peak_memory_per_rank_does_not_grow_with_experts(ep2, work):
    """4 vs 32 experts (same layers; the 32-expert model is ~8x the bytes, mostly experts): peak
    RSS per rank at most 1.2x, both directions, at EP=1 (one rank: holding its experts would add
    ~0.4 GB to ~0.5 GB) and at EP=2 x TP=2 (the 4-rank launch above)."""
    from tests.launch import run_ranks

    commands = []
    for e in MEMORY_EXPERTS:
        mc, back = work / f"mem{e}_mc1", work / f"mem{e}_back1"
        commands += [["hf-to-mcore", "--hf", str(work / f"mem{e}"), "--out", str(mc),
                      "--report", str(work / f"mem{e}_to_mcore_1rank.json")],
                     ["mcore-to-hf", "--ckpt", str(mc), "--out", str(back),
                      "--report", str(work / f"mem{e}_to_hf_1rank.json")]]
    run_ranks(1, "tests.convert_worker", [json.dumps(commands)], env_extra=FRESH_MALLOC)
    for e in MEMORY_EXPERTS:
        shutil.rmtree(work / f"mem{e}_mc1")
        shutil.rmtree(work / f"mem{e}_back1")
    sizes = {e: sum(f.stat().st_size for f in (work / f"mem{e}").glob("*.safetensors")) for e in MEMORY_EXPERTS}
    assert sizes[32] > 6 * sizes[4] and sizes[32] > 350e6, sizes
    lines, worst = [], 0.0
    for direction in ("to_mcore", "to_hf"):
        for ranks in ("1rank", "4ranks"):
            peak = {e: max(r["peak_rss_bytes"] for r in report(work / f"mem{e}_{direction}_{ranks}.json")["ranks"])
                    for e in MEMORY_EXPERTS}
            anon = {e: max(r["peak_anon_bytes"] for r in report(work / f"mem{e}_{direction}_{ranks}.json")["ranks"])
                    for e in MEMORY_EXPERTS}
            ratio = peak[32] / peak[4]
            worst = max(worst, ratio)
            lines.append(f"{direction} {ranks}: peak RSS per rank {peak[4] / 1e6:.0f} MB (4 experts, "
                         f"{sizes[4] / 1e6:.0f} MB) -> {peak[32] / 1e6:.0f} MB (32 experts, {sizes[32] / 1e6:.0f} MB) "
                         f"= {ratio:.3f}x; anonymous {anon[4] / 1e6:.0f} -> {anon[32] / 1e6:.0f} MB")
    print("\n" + "\n".join(lines))
    assert worst <= MEMORY_RATIO, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Broken expert tensors and layouts: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


def drop_stored_expert(ckpt: Path, key: str, expert: int) -> None:
    """Remove one expert's chunks of `key` from a dist checkpoint's metadata (our own file)."""
    meta_file = ckpt / "model" / ".metadata"
    with open(meta_file, "rb") as f:
        md = pickle.load(f)
    md.storage_data = {k: v for k, v in md.storage_data.items() if not (k.fqn == key and k.offset[0] == expert)}
    chunks = md.state_dict_metadata[key].chunks
    chunks[:] = [c for c in chunks if c.offsets[0] != expert]
    with open(meta_file, "wb") as f:
        pickle.dump(md, f)
    # As if written that way: the manifest records the new metadata (else its size/CRC check,
    # not the expert check under test, would refuse the file).
    recorded = manifest.read(ckpt)
    assert recorded and "model/.metadata" in recorded
    manifest.write(ckpt, manifest.collect(ckpt, sorted(recorded)))


def test_broken_experts_are_one_line_naming_the_tensor(tiny_hf_dirs, sources, work):
    qwen, mixtral_fused = sources["qwen3_moe", "per_expert"], sources["mixtral", "fused"]
    gone = "model.layers.2.mlp.experts.3.up_proj.weight"
    broken = {
        "deleted": rewrite_weights(qwen, work / "bad_deleted", lambda t: {k: v for k, v in t.items() if k != gone}),
        "renamed": rewrite_weights(qwen, work / "bad_renamed", lambda t: {
            (k.replace("experts.3.up_proj", "experts.3.upp_proj") if k == gone else k): v for k, v in t.items()}),
        "shape": rewrite_weights(qwen, work / "bad_shape", lambda t: {
            **t, "model.layers.0.mlp.experts.1.down_proj.weight": torch.zeros(128, 63)}),
        "extra": rewrite_weights(qwen, work / "bad_extra", lambda t: {
            **t, "model.layers.0.mlp.experts.4.down_proj.weight": torch.zeros(128, 64)}),
        "fused_shape": rewrite_weights(mixtral_fused, work / "bad_fused_shape", lambda t: {
            **t, "model.layers.2.mlp.experts.down_proj": torch.zeros(4, 128, 95)}),
        "fused_count": rewrite_weights(mixtral_fused, work / "bad_fused_count", lambda t: {
            **t, "model.layers.2.mlp.experts.gate_up_proj": torch.zeros(3, 192, 128)}),
        "fused_missing": rewrite_weights(mixtral_fused, work / "bad_fused_missing", lambda t: {
            k: v for k, v in t.items() if k != "model.layers.3.mlp.experts.down_proj"}),
    }
    out = work / "never"
    cases = [
        (broken["deleted"], f"missing tensors {gone}; the checkpoint is incomplete"),
        (broken["renamed"], f"missing tensors {gone}; unexpected tensors model.layers.2.mlp.experts.3.upp_proj.weight"),
        (broken["shape"], "tensor model.layers.0.mlp.experts.1.down_proj.weight has shape (128, 63) but config.json "
                          "implies (128, 64)"),
        (broken["extra"], "unexpected tensors model.layers.0.mlp.experts.4.down_proj.weight"),
        (broken["fused_shape"], "tensor model.layers.2.mlp.experts.down_proj has shape (4, 128, 95) but config.json "
                                "implies (4, 128, 96)"),
        (broken["fused_count"], "tensor model.layers.2.mlp.experts.gate_up_proj has shape (3, 192, 128) but "
                                "config.json implies (4, 192, 128)"),
        (broken["fused_missing"], "missing tensors model.layers.3.mlp.experts.down_proj;"),
    ]
    for src, needle in cases:
        assert_user_error(run_main("hf-to-mcore", "--hf", src, "--out", out), needle, out)
        assert_user_error(run_main("inspect", src), needle)
    # Layouts that do not divide: one line each.
    for argv, needle in [
        (["--ep", "3"], "--ep=3 does not divide the 4 experts; choose ep from [1, 2, 4]"),
        (["--etp", "3"], "--etp=3 does not divide the experts' FFN width 64"),
        (["--ep", "0"], "--ep=0: must be >= 1"),
        (["--tp", "3", "--ep", "2"], "--tp=3 does not divide the 4 attention heads"),
    ]:
        assert_user_error(run_main("hf-to-mcore", "--hf", qwen, "--out", out, *argv), needle, out)
    assert_user_error(run_main("hf-to-mcore", "--hf", tiny_hf_dirs["llama"], "--out", out, "--ep", "2"),
                      "--ep=2, --etp=1: expert parallelism needs a mixture-of-experts model", out)
    # The CLI as a user runs it: one line, exit 2.
    assert_user_error(run_cli("hf-to-mcore", "--hf", broken["deleted"], "--out", out), f"missing tensors {gone}", out)

    # mcore-to-hf: a checkpoint lacking one stored expert, or not matching its config.json.
    mc = work / "mc_qwen_ep1"
    ok(run_main("hf-to-mcore", "--hf", qwen, "--out", mc))
    lacking = work / "mc_lacking_expert"
    shutil.copytree(mc, lacking)
    drop_stored_expert(lacking, "decoder.layers.2.mlp.experts.experts.linear_fc2.weight", 3)
    assert_user_error(run_main("mcore-to-hf", "--ckpt", lacking, "--out", out),
                      "does not store all of decoder.layers.2.mlp.experts.experts.linear_fc2.weight[3] (HF "
                      "model.layers.2.mlp.experts.3.down_proj.weight)", out)
    other = work / "mc_other_config"
    shutil.copytree(mc, other)
    meta = json.loads((other / "aipo_checkpoint.json").read_text())
    meta["hf_config"]["moe_intermediate_size"] = 32
    (other / "aipo_checkpoint.json").write_text(json.dumps(meta))
    assert_user_error(run_main("mcore-to-hf", "--ckpt", other, "--out", out),
                      "makes model.layers.0.mlp.experts.0.gate_proj.weight of shape (64, 128), but config.json "
                      "implies (32, 128)", out)
