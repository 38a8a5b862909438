"""MXFP4 expert weights (the gpt-oss release format) read as bf16: `dequantize_mxfp4` equals
transformers' own dequantization bit for bit (random bytes, every code and every exponent byte);
the HF reader presents `X_blocks` / `X_scales` as the bf16 tensor `X` (names, shape, dtype, whole
tensor, experts by `read_into` with and without a column range, one expert dequantized at a time);
a broken pair (no scales, scales without blocks, wrong shapes or dtype) is one error line naming
the tensor, also through the CLI; a whole MXFP4 tiny gpt-oss directory reads, expert by expert,
as transformers' own loader dequantizes it."""

from __future__ import annotations

import json

import pytest
import torch

from aipo_mp.errors import CheckpointError

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
E, HIDDEN, INTER = 3, 64, 32  # gpt-oss layout: gate_up [E, hidden, 2 x inter], down [E, inter, hidden]


def random_mxfp4(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and scales for an [E, cols, rows] tensor: any byte, so every code pair and
    every exponent (including the ones that overflow bf16) occurs."""
    e, cols, rows = shape
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bf16 bit patterns (equal even where both are inf or NaN)."""
    return t.contiguous().view(torch.int16)


def test_dequantize_mxfp4_equals_transformers_bit_for_bit():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from aipo_mp.convert.quantized import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4

    for shape, seed in (((E, HIDDEN, 2 * INTER), 0), ((E, INTER, HIDDEN), 1), ((2, 96, 5), 2)):
        blocks, scales = random_mxfp4(shape, seed)
        theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone())
        ours = dequantize_mxfp4(blocks, scales)
        assert ours.shape == theirs.shape == shape and ours.dtype == theirs.dtype == torch.bfloat16
        assert torch.equal(bits(ours), bits(theirs)), shape
        assert (ours.float().abs() > 0).float().mean() > 0.5  # not all zeros: a blank result would fail
    # Every code with a scale of 2^0: the E2M1 table itself, low nibble first.
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes | (codes.flip(0) << 4)).reshape(1, 1, 1, 16)
    values = dequantize_mxfp4(blocks, torch.full((1, 1, 1), 127, dtype=torch.uint8))[0, :, 0]
    assert values[0::2].tolist() == list(FP4_VALUES) and values[1::2].tolist() == list(FP4_VALUES)[::-1]
    # Realistic weights survive a quantize -> dequantize round trip within E2M1's precision.
    w = (torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    qb, qs = quantize_mxfp4(w)
    back = dequantize_mxfp4(qb, qs)
    assert torch.equal(bits(back), bits(convert_moe_packed_tensors(qb, qs)))
    assert (back.float() - w.float()).abs().max() <= w.float().abs().max() / 3


def write_mxfp4_dir(d, tensors: dict, config: dict | None = None):
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = config if config is not None else {}  # the reader alone: no family, no fused-expert presentation
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    return d


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A gpt-oss-style MXFP4 layer: fused experts as blocks + scales, an unquantized bias."""
    gu, down = random_mxfp4((E, HIDDEN, 2 * INTER), 4), random_mxfp4((E, INTER, HIDDEN), 5)
    tensors = {GATE_UP + "_blocks": gu[0], GATE_UP + "_scales": gu[1], DOWN + "_blocks": down[0],
               DOWN + "_scales": down[1], GATE_UP + "_bias": torch.randn(E, 2 * INTER, dtype=torch.bfloat16)}
    return write_mxfp4_dir(tmp_path_factory.mktemp("mxfp4") / "release", tensors), tensors


def test_reader_presents_mxfp4_pairs_as_bf16_tensors_read_expert_by_expert(release, monkeypatch):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from aipo_mp.convert import quantized
    from aipo_mp.convert.hf_io import HFWeights, Virtual
    from aipo_mp.convert.tensor_io import SafetensorsSource

    d, tensors = release
    w = HFWeights(d)
    assert sorted(w.names()) == sorted([GATE_UP, DOWN, GATE_UP + "_bias"])
    assert w.shape(GATE_UP) == (E, HIDDEN, 2 * INTER) and w.shape(DOWN) == (E, INTER, HIDDEN)
    assert w.dtype(GATE_UP) == w.dtype(DOWN) == "bf16"
    want = {n: convert_moe_packed_tensors(tensors[n + "_blocks"], tensors[n + "_scales"]) for n in (GATE_UP, DOWN)}
    for n in (GATE_UP, DOWN):
        assert torch.equal(bits(w.get(n)), bits(want[n])), n
    assert torch.equal(w.get(GATE_UP + "_bias"), tensors[GATE_UP + "_bias"])

    # Streaming: experts 1..2 (whole, and a column range cast to fp32) read one expert at a time.
    seen = []
    real = quantized.dequantize_mxfp4
    monkeypatch.setattr(quantized, "dequantize_mxfp4", lambda b, s, *a, **k: seen.append(b.shape[0]) or real(b, s, *a, **k))
    src = SafetensorsSource(w)
    dst = torch.empty(2, HIDDEN, 2 * INTER, dtype=torch.bfloat16)
    assert src.read_into(dst, GATE_UP, 1)
    assert torch.equal(bits(dst), bits(want[GATE_UP][1:3])) and seen == [1, 1]
    part = torch.empty(2, 8, HIDDEN, dtype=torch.float32)
    assert src.read_into(part, DOWN, 0, cols=(8, 16))
    assert torch.equal(part, want[DOWN][0:2, 8:16].float()) and seen == [1] * 4
    assert torch.equal(bits(src.view(DOWN)), bits(want[DOWN]))
    # A per-expert slice of the fused tensor (how a family presents expert 2's matrix): rows 5..9
    # of it, columns 3..7, from that one expert.
    seen.clear()
    w.virtual["model.layers.0.mlp.experts.2.gate_up_proj"] = Virtual(GATE_UP, 2, 0, HIDDEN, (HIDDEN, 2 * INTER))
    assert w.shape("model.layers.0.mlp.experts.2.gate_up_proj") == (HIDDEN, 2 * INTER)
    assert w.dtype("model.layers.0.mlp.experts.2.gate_up_proj") == "bf16"
    rows = torch.empty(4, 4, dtype=torch.bfloat16)
    assert src.read_into(rows, "model.layers.0.mlp.experts.2.gate_up_proj", 5, cols=(3, 7))
    assert torch.equal(bits(rows), bits(want[GATE_UP][2, 5:9, 3:7])) and seen == [1]
    assert torch.equal(bits(w.get("model.layers.0.mlp.experts.2.gate_up_proj")), bits(want[GATE_UP][2]))


def test_broken_mxfp4_pairs_are_one_line_naming_the_tensor(release, tmp_path):
    from aipo_mp.convert.hf_io import HFWeights

    _, tensors = release
    cases = {
        "no_scales": ({k: v for k, v in tensors.items() if k != DOWN + "_scales"},
                      f"MXFP4 tensor {DOWN}_blocks has no {DOWN}_scales"),
        "no_blocks": ({k: v for k, v in tensors.items() if k != DOWN + "_blocks"},
                      f"holds {DOWN}_scales but not the MXFP4 blocks {DOWN}_blocks"),
        "scales_shape": ({**tensors, DOWN + "_scales": tensors[DOWN + "_scales"][:, :-1]},
                         f"MXFP4 tensor {DOWN}_scales has shape ({E}, {HIDDEN - 1}, 1)"),
        "blocks_shape": ({**tensors, GATE_UP + "_blocks": tensors[GATE_UP + "_blocks"].reshape(E, 2 * INTER, 4, 8)},
                         f"MXFP4 tensor {GATE_UP}_blocks has shape ({E}, {2 * INTER}, 4, 8)"),
        "dtype": ({**tensors, GATE_UP + "_scales": tensors[GATE_UP + "_scales"].float()},
                  f"MXFP4 tensor {GATE_UP}_scales is F32, expected uint8"),
        "both": ({**tensors, "model.x_proj_blocks": tensors[DOWN + "_blocks"], "model.x_proj_scales":
                  tensors[DOWN + "_scales"], "model.x_proj": torch.zeros(2, 2)},
                 "holds both model.x_proj and its MXFP4 blocks model.x_proj_blocks"),
    }
    for case, (broken, needle) in cases.items():
        with pytest.raises(CheckpointError) as e:
            HFWeights(write_mxfp4_dir(tmp_path / case, broken))
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, (case, msg)


def test_broken_mxfp4_source_through_the_cli_is_one_error_line(release, tmp_path):
    """The converter CLI on an MXFP4 directory lacking a scale: one `error:` line, exit 2, before
    any weight is read or any output exists."""
    import contextlib
    import io

    from aipo_mp.convert.cli import main
    from aipo_mp.models import hf_config_for
    from tests.conftest import tiny_arch

    _, tensors = release
    d = write_mxfp4_dir(tmp_path / "src", {k: v for k, v in tensors.items() if k != GATE_UP + "_scales"},
                        hf_config_for(tiny_arch("qwen3_moe")))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["hf-to-mcore", "--hf", str(d), "--out", str(tmp_path / "mc")])
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    assert f"{GATE_UP}_blocks has no {GATE_UP}_scales" in lines[0]
    assert not (tmp_path / "mc").exists()


def test_mxfp4_gpt_oss_directory_reads_as_transformers_loads_it(tmp_path):
    """The tiny gpt-oss with its experts stored as the releases store them (gate_up_proj and
    down_proj as MXFP4 blocks + scales, quantization_config mxfp4): the project's checks pass
    (every name and shape against config.json) and every tensor it presents, each expert's slice
    included, equals what transformers' own loader (dequantize=True) makes of the directory."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from aipo_mp.convert.common import hf_source
    from aipo_mp.convert.quantized import quantize_mxfp4
    from aipo_mp.testing.hf_build import save_hf_model
    from tests.conftest import tiny_arch

    plain = save_hf_model(tiny_arch("gpt_oss"), tmp_path / "plain", seed=11)
    release = tmp_path / "mxfp4"
    shutil.copytree(plain, release)
    stored, quantized = {}, 0
    for name, t in load_file(plain / "model.safetensors").items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            stored[name + "_blocks"], stored[name + "_scales"] = quantize_mxfp4(t)
            quantized += 1
        else:
            stored[name] = t
    save_file(stored, str(release / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((release / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (release / "config.json").write_text(json.dumps(cfg))
    assert quantized == 2 * tiny_arch("gpt_oss").num_layers

    src = hf_source(release)  # names and shapes, as hf-to-mcore, inspect and train check them
    model, info = AutoModelForCausalLM.from_pretrained(str(release), quantization_config=Mxfp4Config(dequantize=True),
                                                       dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    theirs = model.state_dict()
    experts = 0
    for name in src.weights.names():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():  # expert e's slice
            k = parts.index("experts")
            want = theirs[".".join(parts[:k + 1] + parts[k + 2:])][int(parts[k + 1])]
            experts += name.endswith("_proj")
        else:
            want = theirs[name]
        got = src.weights.get(name)
        if ".experts." in name and name.endswith(("gate_up_proj", "down_proj")):
            assert src.weights.dtype(name) == "bf16" and got.dtype == torch.bfloat16, name  # dequantized
        assert torch.equal(bits(got.to(torch.bfloat16)), bits(want)), name
    assert experts == 2 * tiny_arch("gpt_oss").num_layers * tiny_arch("gpt_oss").num_experts
