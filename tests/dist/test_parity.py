"""Megatron logits equal transformers logits (fp32, max abs diff <= 1e-4) for llama, mistral and
gemma2 at TP=1, TP=2 (sequence parallel), PP=2, PP=2 x VPP=2 and TP=2 x PP=2 (4 gloo processes),
and for the tiny Llama-3.1 (llama3 RoPE scaling), Qwen2.5 (q/k/v biases, tied) and Qwen3 (q/k
norms) at TP=1, TP=2 + SP, PP=2 and TP=2 x PP=2 + SP, on a packed row of several sequences of
different lengths: each sequence's logits are compared with HF's logits of that sequence alone.
The mixtures of experts (Qwen3-MoE, Mixtral, DeepSeek-V3: latent attention, grouped sigmoid
routing with a non-zero expert bias, a shared expert; gpt-oss: attention sinks, a sliding-window
layer, biases everywhere, fused interleaved experts, the clamped SwiGLU, yarn) run at EP1, EP2
and TP2 x EP2."""

from __future__ import annotations

import json

import pytest
import torch

from aipo_mp.convert.verify import make_reference
from aipo_mp.models import arch_from_dir
from tests.conftest import FAMILIES, MOE_MODELS, NEW_MODELS, tiny_arch
from tests.launch import run_ranks

TOL = 1e-4
# The reference row (checkpoint_tools.make_reference) packs sequences of 24, 13 and 7 tokens:
# gemma2-tiny's window is 8, shorter than the first two.


@pytest.fixture(scope="module")
def model_dirs(tiny_hf_dirs, tmp_path_factory):
    """The shared tiny models plus the tiny DeepSeek-V3 and gpt-oss (configs/models/tiny_*.yaml)."""
    from aipo_mp.testing.hf_build import save_hf_model

    d = save_hf_model(tiny_arch("deepseek_v3"), tmp_path_factory.mktemp("tiny_ds") / "deepseek_v3", seed=11)
    g = save_hf_model(tiny_arch("gpt_oss"), tmp_path_factory.mktemp("tiny_go") / "gpt_oss", seed=11)
    return {**tiny_hf_dirs, "deepseek_v3": d, "gpt_oss": g}


@pytest.fixture(scope="module")
def references(model_dirs, tmp_path_factory):
    base = tmp_path_factory.mktemp("parity_ref")
    refs = {}
    for fam, d in model_dirs.items():
        refs[fam] = str(base / f"{fam}.pt")
        make_reference(d, refs[fam], arch_from_dir(d))
    return refs


def run_cases(world: int, cases: list[dict], references: dict, tmp_path) -> list[dict]:
    spec, out = tmp_path / f"spec{world}.json", tmp_path / f"res{world}.json"
    spec.write_text(json.dumps({"cases": cases, "reference": references}))
    run_ranks(world, "tests.parity_worker", [str(spec), str(out)])
    return json.loads(out.read_text())


def assert_close(results: list[dict], expected_cases: int) -> None:
    assert len(results) == expected_cases
    for r in results:  # shown with `pytest -s`
        print(f"parity {r['family']} tp={r['tp']} pp={r['pp']} ep={r.get('ep', 1)} etp={r.get('etp', 1)} vpp={r.get('vpp', 1)} sp={r.get('sp', False)}: "
              f"max |logit diff| = {r['max_abs_diff']:.1e}")
    bad = [r for r in results if not r["max_abs_diff"] <= TOL]
    assert not bad, f"logits differ beyond {TOL}: {bad}"


@pytest.mark.dist
def test_parity_single_process(tiny_hf_dirs, references, tmp_path):
    cases = [dict(family=f, hf_dir=str(tiny_hf_dirs[f]), tp=1, pp=1) for f in FAMILIES + NEW_MODELS]
    assert_close(run_cases(1, cases, references, tmp_path), 6)


@pytest.mark.dist
def test_parity_two_ranks(tiny_hf_dirs, references, tmp_path):
    cases = []
    for f in FAMILIES:
        d = str(tiny_hf_dirs[f])
        cases += [dict(family=f, hf_dir=d, tp=2, pp=1, sp=True), dict(family=f, hf_dir=d, tp=2, pp=1, sp=False),
                  dict(family=f, hf_dir=d, tp=1, pp=2), dict(family=f, hf_dir=d, tp=1, pp=2, vpp=2)]
    for f in NEW_MODELS:
        d = str(tiny_hf_dirs[f])
        cases += [dict(family=f, hf_dir=d, tp=2, pp=1, sp=True), dict(family=f, hf_dir=d, tp=1, pp=2)]
    assert_close(run_cases(2, cases, references, tmp_path), 18)


@pytest.mark.dist
def test_parity_four_ranks(tiny_hf_dirs, references, tmp_path):
    cases = [dict(family=f, hf_dir=str(tiny_hf_dirs[f]), tp=2, pp=2, sp=True) for f in FAMILIES + NEW_MODELS]
    assert_close(run_cases(4, cases, references, tmp_path), 6)


def test_packed_rows_really_exercise_windows_and_softcaps(tiny_hf_dirs):
    """Guard against a vacuous parity test: the tiny gemma2's window and soft-caps change HF logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["gemma2"], dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        for attr, value in (("sliding_window", 4096), ("final_logit_softcapping", None), ("attn_logit_softcapping", None)):
            old = getattr(model.config, attr)
            set_everywhere(model, attr, value)
            changed = (model(ids).logits - base).abs().max()
            set_everywhere(model, attr, old)
            assert changed > 1e-3, f"{attr} has no effect on the tiny gemma2; the parity test would not see it"


def set_everywhere(model, attr: str, value) -> None:
    """HF copies some config values into each attention module at construction."""
    setattr(model.config, attr, value)
    for layer in model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, attr) and not (attr == "sliding_window" and getattr(attn, attr) is None):
            setattr(attn, attr, value)


def test_tiny_llama3_1_scaling_really_changes_the_logits(tiny_hf_dirs):
    """Guard against a vacuous llama3 parity case: at the reference row's longest length (24
    tokens) the tiny Llama-3.1's RoPE scaling changes HF's logits, so a Megatron model that
    ignored it would fail the parity bar."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tiny_hf_dirs["llama3_1"]
    plain_cfg = AutoConfig.from_pretrained(d)
    assert plain_cfg.rope_parameters["rope_type"] == "llama3"
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": plain_cfg.rope_parameters["rope_theta"]}
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scaled = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()(ids)
        plain = AutoModelForCausalLM.from_pretrained(d, config=plain_cfg, dtype=torch.float32,
                                                     attn_implementation="eager").eval()(ids)
    assert (scaled.logits - plain.logits).abs().max() > 1e-2


def moe_cases(model_dirs, layouts: list[dict], deepseek: bool = True) -> list[dict]:
    """Every MoE family at each layout; DeepSeek-V3 (3 layers) only where no pipeline split is asked,
    gpt-oss only at expert-TP 1 (megatron supports expert biases only unsplit)."""
    fams = MOE_MODELS + (("deepseek_v3", "gpt_oss") if deepseek else ())
    return [dict(family=f, hf_dir=str(model_dirs[f]), **lay) for f in fams for lay in layouts
            if not (f == "deepseek_v3" and lay.get("pp", 1) > 1) and not (f == "gpt_oss" and lay.get("etp", 1) > 1)]


@pytest.mark.dist
def test_moe_parity_one_and_two_ranks(model_dirs, references, tmp_path):
    """Qwen3-MoE, Mixtral (4 experts, top-2) and DeepSeek-V3 (8 experts in 2 groups, top-2, a shared
    expert) and gpt-oss (4 experts, top-2) at EP1 and EP2, both token dispatchers."""
    assert_close(run_cases(1, moe_cases(model_dirs, [dict(tp=1, pp=1)]), references, tmp_path), 4)
    layouts = [dict(tp=1, pp=1, ep=2), dict(tp=1, pp=1, ep=2, dispatcher="allgather"), dict(tp=1, pp=2)]
    assert_close(run_cases(2, moe_cases(model_dirs, layouts), references, tmp_path), 11)


@pytest.mark.dist
def test_moe_parity_four_ranks(model_dirs, references, tmp_path):
    """TP2 x EP2 (expert-TP 1 and 2) and PP2 x EP2."""
    layouts = [dict(tp=2, pp=1, sp=True, ep=2), dict(tp=2, pp=1, sp=True, ep=2, etp=2), dict(tp=1, pp=2, ep=2)]
    assert_close(run_cases(4, moe_cases(model_dirs, layouts), references, tmp_path), 10)


def test_tiny_deepseek_v3_bias_and_yarn_really_change_the_logits(model_dirs):
    """Guard against a vacuous DeepSeek-V3 parity case: zeroing the tiny model's expert bias (which
    only selects experts) or its yarn scaling changes HF's logits on the reference row's lengths by
    more than 10x the parity bar, so a Megatron model that ignored either would fail it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = model_dirs["deepseek_v3"]
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        base = model(ids).logits
        biases = [layer.mlp.gate.e_score_correction_bias for layer in model.model.layers[1:]]
        assert all(b.abs().max() > 0.01 for b in biases)
        for b in biases:
            b.zero_()
        unbiased = model(ids).logits
    cfg = AutoConfig.from_pretrained(d)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32,
                                                     attn_implementation="eager").eval()(ids).logits
    assert (base - unbiased).abs().max() > 10 * TOL
    assert (base - plain).abs().max() > 10 * TOL


def test_tiny_gpt_oss_features_really_change_the_logits(model_dirs):
    """Guard against a vacuous gpt-oss parity case: on the reference row's lengths, zeroing the tiny
    model's sinks, its attention or router or expert biases, widening its window, lifting the
    SwiGLU clamp, dropping the (up + 1) offset or its yarn scaling each changes HF's logits by more
    than 10x the parity bar, so a Megatron model that ignored any of them would fail it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = model_dirs["gpt_oss"]
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    def load(config=None):
        return AutoModelForCausalLM.from_pretrained(d, config=config, dtype=torch.float32,
                                                    attn_implementation="eager").eval()

    model = load()
    base = logits(model)
    zeroed = {"sinks": "self_attn.sinks", "attention biases": "self_attn.q_proj.bias",
              "router bias": "mlp.router.bias", "expert biases": "mlp.experts.gate_up_proj_bias"}
    for what, suffix in zeroed.items():
        changed = load()
        with torch.no_grad():
            for name, p in changed.named_parameters():
                if name.endswith(suffix) or (what == "attention biases" and name.endswith("_proj.bias")
                                             and "self_attn" in name):
                    p.zero_()
        assert (logits(changed) - base).abs().max() > 10 * TOL, what
    experts = model.model.layers[0].mlp.experts
    limit = experts.limit
    experts.limit = 1e9
    assert (logits(model) - base).abs().max() > 10 * TOL, "swiglu clamp"
    experts.limit = limit
    gate_only = experts.__class__._apply_gate

    def without_offset(gate_up):  # the same clamps and gate, times up instead of (up + 1)
        g = gate_up[..., ::2].clamp(max=limit)
        return g * torch.sigmoid(g * experts.alpha) * gate_up[..., 1::2].clamp(-limit, limit)

    experts._apply_gate = without_offset
    assert (logits(model) - base).abs().max() > 10 * TOL, "(up + 1) offset"
    experts._apply_gate = gate_only.__get__(experts)
    cfg = AutoConfig.from_pretrained(d)
    cfg.sliding_window = 4096
    assert (logits(load(cfg)) - base).abs().max() > 10 * TOL, "sliding window"
    cfg = AutoConfig.from_pretrained(d)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
    assert (logits(load(cfg)) - base).abs().max() > 10 * TOL, "yarn"
