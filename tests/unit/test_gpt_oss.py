"""gpt-oss: the mapping table against what transformers saves, the interleaved expert transform
both ways, transformers' yarn, the refusals, the parameter count (tiny and 120b against the
published numbers), and the 120b recipe against the planner."""

from __future__ import annotations

import pytest
import torch

from aipo_mp.config import load_config
from aipo_mp.errors import ConfigError
from aipo_mp.models import arch_from_hf_config, get_family, hf_config_for, num_params
from aipo_mp.planner import plan
from aipo_mp.validate import validate
from tests.conftest import ROOT, tiny_arch


def _model_arch(name: str):
    return load_config(ROOT / "configs" / "models" / f"{name}.yaml").model.arch


def test_names_shapes_count_and_config_equal_transformers(tmp_path):
    """The table names exactly what transformers saves, once the reader presents the fused experts
    per expert; the shape table matches every presented shape; num_params equals transformers'
    parameter count; the exported config.json reads back to the same architecture."""
    from aipo_mp.convert.hf_io import HFWeights
    from aipo_mp.models.gpt_oss import expected_shapes
    from aipo_mp.testing.hf_build import save_hf_model

    arch = tiny_arch("gpt_oss")
    d = save_hf_model(arch, tmp_path / "m", seed=3)
    weights = HFWeights(d)
    names = get_family("gpt_oss").hf_names(arch)
    assert sorted(weights.names()) == sorted(names) and len(set(names)) == len(names)
    assert expected_shapes(arch, names) == {n: weights.shape(n) for n in names}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert num_params(arch) == sum(p.numel() for p in model.parameters())
    active_unused = arch.num_layers * (arch.num_experts - arch.num_experts_per_tok) * (
        3 * arch.hidden_size * arch.moe_intermediate_size + 2 * arch.moe_intermediate_size + arch.hidden_size)
    assert num_params(arch) - num_params(arch, active=True) == active_unused
    # Expert 2's per-expert slices are the fused tensors' [2].
    fused = model.model.layers[1].mlp.experts
    for part in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        assert torch.equal(weights.get(f"model.layers.1.mlp.experts.2.{part}"), getattr(fused, part)[2].detach())
    assert arch_from_hf_config(hf_config_for(arch)) == arch


def test_interleaved_experts_map_to_megatron_gate_then_up_and_back():
    """linear_fc1 = [gate; up] rows from the interleaved [hidden, 2I] matrix (and [2I] bias), fc2 the
    transposed down projection; to_hf inverts each exactly."""
    from aipo_mp.models.build import to_hf, to_megatron

    arch = tiny_arch("gpt_oss")
    family = get_family("gpt_oss")
    h, w = arch.hidden_size, arch.moe_intermediate_size
    gate_up, bias, down = torch.randn(h, 2 * w), torch.randn(2 * w), torch.randn(w, h)
    fc1, _ = family.rule_for(arch, "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight")
    fc1_bias, _ = family.rule_for(arch, "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.bias")
    fc2, _ = family.rule_for(arch, "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight")
    m = to_megatron(fc1, [gate_up], arch)
    assert torch.equal(m, torch.cat([gate_up[:, 0::2].t(), gate_up[:, 1::2].t()]))
    mb = to_megatron(fc1_bias, [bias], arch)
    assert torch.equal(mb, torch.cat([bias[0::2], bias[1::2]]))
    assert torch.equal(to_megatron(fc2, [down], arch), down.t())
    assert torch.equal(to_hf(fc1, m, arch)[0], gate_up)
    assert torch.equal(to_hf(fc1_bias, mb, arch)[0], bias)
    assert torch.equal(to_hf(fc2, down.t().contiguous(), arch)[0], down)


def test_yarn_inverse_frequencies_and_factor_equal_transformers():
    """Released yarn (factor 32, truncate false) and a truncating one: inv_freq equal to transformers'
    exactly, and the attention factor equal to its cos/sin scaling."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from aipo_mp.models.rope import yarn_attention_factor, yarn_inv_freq

    for truncate in (False, True):
        yarn = dict(factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                    truncate=truncate)
        cfg = GptOssConfig(head_dim=64, max_position_embeddings=131072,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, **yarn})
        want, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
        assert torch.equal(yarn_inv_freq(64, 150000.0, yarn), want)
        assert yarn_attention_factor(yarn) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("change, message", [
    ({"swiglu_limit": 10.0}, "swiglu_limit=10.0 is not supported"),
    ({"swiglu_alpha": 1.5}, "swiglu_alpha=1.5 is not supported"),
    ({"attention_bias": False}, "attention_bias=false is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "RoPE type 'llama3' is not supported"),
])
def test_configs_megatron_cannot_reproduce_are_refused(change, message):
    hf = {**hf_config_for(tiny_arch("gpt_oss")), **change}
    with pytest.raises(ConfigError, match=message):
        arch_from_hf_config(hf)


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2", "parallel.etp=2"],
     "parallel.etp=2: gpt-oss's experts have biases"),
    (["model.arch.dense_layers=[1]"], "every gpt-oss layer is a mixture of experts"),
    (["model.arch.layer_types=[sliding_attention]"], "model.arch.layer_types"),
])
def test_archs_and_layouts_that_do_not_fit_are_refused(overrides, fragment):
    cfg = load_config(ROOT / "configs" / "models" / "tiny_gpt_oss.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=4)
    assert any(fragment in line for line in e.value.errors), e.value.errors


def test_missing_expert_tensor_is_named(tmp_path):
    """A checkpoint without a layer's fused expert biases: the name check names the fused tensor
    that is missing, once (no expert is ever left randomly initialised); a fused tensor of the
    wrong shape is named with the slice that does not fit."""
    from safetensors.torch import load_file, save_file

    from aipo_mp.convert.hf_io import HFWeights, check_tensor_names
    from aipo_mp.errors import CheckpointError
    from aipo_mp.testing.hf_build import save_hf_model

    arch = tiny_arch("gpt_oss")
    d = save_hf_model(arch, tmp_path / "m", seed=3)
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.mlp.experts.down_proj_bias"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.down_proj_bias$"):
        check_tensor_names(HFWeights(d), get_family("gpt_oss").hf_names(arch))
    from aipo_mp.convert.common import hf_source

    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.mlp\.experts\.down_proj_bias;"):
        hf_source(d)
    state["model.layers.1.mlp.experts.down_proj_bias"] = torch.zeros(arch.num_experts, arch.hidden_size)
    state["model.layers.0.mlp.experts.down_proj"] = torch.zeros(arch.num_experts, 64, 127)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.experts\.down_proj \(expert slice "
                                              r"model\.layers\.0\.mlp\.experts\.0\.down_proj\) has shape \(64, 127\)"):
        hf_source(d)


def test_gpt_oss_120b_config_has_the_published_sizes_and_parameter_count():
    """configs/models/gpt_oss_120b.yaml equals transformers' GptOssConfig defaults (gpt-oss-120b's
    published config.json) and reads back through config.json; 116.8B parameters in total and
    5.1B active per token as published (the published active count leaves out the input
    embedding, a lookup: 5.13B here, 5.71B with it)."""
    from transformers import GptOssConfig

    arch = _model_arch("gpt_oss_120b")
    exported, published = hf_config_for(arch), GptOssConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
                "layer_types", "rms_norm_eps", "max_position_embeddings", "swiglu_limit", "swiglu_alpha"):
        assert exported[key] == getattr(published, key), key
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"):
        assert exported["rope_parameters"][key] == published.rope_parameters[key], key
    assert arch_from_hf_config(exported) == arch
    assert abs(num_params(arch) / 116.83e9 - 1) < 0.001
    embedding = arch.vocab_size * arch.hidden_size
    assert abs((num_params(arch, active=True) - embedding) / 5.13e9 - 1) < 0.005


def test_gpt_oss_120b_recipe_is_the_planners_top_row():
    """configs/recipes/aipo_gpt_oss_120b.yaml (4 nodes x 8 H100-80GB) trains on the planner's top
    layout, its sampling engine is the one the planner chooses (expert parallel), the engines fill
    the allocation, and the whole recipe validates at its world size."""
    from aipo_mp import planner

    cfg = load_config(ROOT / "configs" / "recipes" / "aipo_gpt_oss_120b.yaml")
    gpus = cfg.cluster.nodes * cfg.cluster.nproc_per_node
    assert gpus == 32
    top = plan(cfg.model.arch, gpus, "h100-80gb")[0]
    par = cfg.parallel
    assert top.fits
    assert (top.layout.tp, top.layout.pp, top.layout.vpp, top.layout.ep, top.layout.etp) == \
        (par.tp, par.pp, par.vpp, par.ep, par.etp)
    assert top.recompute == cfg.train.recompute
    assert not plan(cfg.model.arch, 16, "h100-80gb")[0].fits  # 2 nodes do not hold it
    ss = planner.sampling_settings(cfg, 32)
    chosen = planner.choose_engine(planner.engine_options(cfg.model.arch, "h100-80gb", cfg.cluster.nproc_per_node,
                                                          ss))
    s = cfg.sampling
    assert (s.tensor_parallel, s.pipeline_parallel, s.data_parallel) == (chosen.tp, chosen.pp, chosen.dp)
    assert s.expert_parallel and s.replicas * chosen.gpus == gpus
    cfg.model.path = None  # a placeholder path on this machine
    validate(cfg, world_size=gpus)


def test_runs_that_hand_off_a_gpt_oss_policy_validate(capsys, monkeypatch):
    """gpt-oss has an HF export (mcore-to-hf, the trainer's handoff): `train` with output.hf_dir
    validates, and `aipo-mp run` (which hands every round's policy to vLLM through it) plans its
    rounds, sampling and the handoff included."""
    import os

    from aipo_mp.cli import main

    cfg = load_config(ROOT / "configs" / "recipes" / "aipo_gpt_oss_120b.yaml")
    cfg.model.path, gpus = None, cfg.cluster.nodes * cfg.cluster.nproc_per_node
    cfg.output.hf_dir = "/tmp/handoff"
    assert validate(cfg, world_size=gpus).family == "gpt_oss"

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        main(["run", str(ROOT / "configs" / "recipes" / "aipo_gpt_oss_120b.yaml"), "--launcher", "slurm", "--dry-run"])
    out, err = capsys.readouterr()
    assert exit_code.value.code in (0, None), err
    assert "round0-sample" in out and "output.hf_dir=" in out and "round1-export" in out, out
    assert "error:" not in err and "Traceback" not in err, err


def test_export_plans_fused_expert_names_and_writes_them_expert_by_expert(tmp_path):
    """An export names each layer's fused expert tensors (not the per-expert slices the reader
    presents), and the stream writer appends a fused tensor expert by expert: the file reads back as
    the stacked experts; a part of the wrong shape or a missing expert is refused."""
    from safetensors import safe_open

    from aipo_mp.convert.tensor_io import Entry, Pieces, SafetensorsStreamWriter

    arch, family = tiny_arch("gpt_oss"), get_family("gpt_oss")
    names = family.export_names(arch)
    fused = [f"model.layers.{i}.mlp.experts.{p}" for i in range(arch.num_layers)
             for p in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")]
    assert set(fused) <= set(names) and not any(".experts.0." in n for n in names)
    assert len(names) == len(family.hf_names(arch)) - len(fused) * (arch.num_experts - 1)
    assert family.fused_name("model.layers.1.mlp.experts.3.gate_up_proj_bias") == fused[5]
    assert family.fused_name("model.layers.1.mlp.router.bias") is None
    assert get_family("mixtral").export_names(tiny_arch("mixtral")) == get_family("mixtral").hf_names(tiny_arch("mixtral"))

    experts = [torch.randn(8, 6).to(torch.bfloat16) for _ in range(arch.num_experts)]
    entry = Entry("fused", (arch.num_experts, 8, 6), torch.bfloat16)
    made = []
    writer = SafetensorsStreamWriter(tmp_path / "f.safetensors", [entry])
    writer.write("fused", Pieces(entry.shape, entry.dtype, lambda: (made.append(e) or t[None] for e, t in enumerate(experts))))
    writer.close()
    assert made == list(range(arch.num_experts))
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("fused"), torch.stack(experts))
    for bad, needle in ((experts[:-1], "got 3 of its 4 rows"), ([torch.zeros(8, 5, dtype=torch.bfloat16)], "part of")):
        writer = SafetensorsStreamWriter(tmp_path / "bad.safetensors", [entry])
        with pytest.raises(RuntimeError, match=needle):
            writer.write("fused", Pieces(entry.shape, entry.dtype, lambda b=bad: (t[None] for t in b)))
        writer.abort()


def test_table_round_trip_at_tp2_ep2_is_bit_exact_and_transformers_loads_it(tmp_path):
    """HF (bf16) -> Megatron shards of a TP2 x EP2 layout (the table's transforms and TP slices,
    as weight loading applies them) -> merged -> HF per-expert tensors -> re-fused: bit-exact,
    fused interleaved experts and biases included, and transformers loads the result with the
    same logits. (The streaming converters' round trip: tests/e2e/test_convert_moe.py.)"""
    from transformers import AutoModelForCausalLM

    from aipo_mp.convert.hf_io import HFWeights
    from aipo_mp.models.build import to_hf, to_megatron, tp_merge, tp_slice
    from aipo_mp.models.family import rule_indices
    from aipo_mp.testing.hf_build import save_hf_model

    arch = tiny_arch("gpt_oss")
    d = save_hf_model(arch, tmp_path / "m", seed=5)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    weights, family, tp = HFWeights(tmp_path / "bf16"), get_family("gpt_oss"), 2
    per_expert = {}
    for rule in family.rules(arch):
        for index in rule_indices(rule, arch):
            full = to_megatron(rule, [weights.get(n) for n in rule.hf_at(index)], arch)
            size = 1 if rule.expert else tp  # expert-TP 1; experts split over EP by index
            shards = [tp_slice(full, rule.split, r, size).clone() for r in range(size)]
            for name, t in zip(rule.hf_at(index), to_hf(rule, tp_merge(shards, rule.split), arch)):
                per_expert[name] = t
    fused = {}
    for name, t in per_expert.items():
        parts = name.split(".")
        if "experts" in parts:  # model.layers.i.mlp.experts.e.part -> model.layers.i.mlp.experts.part [E, ...]
            k = parts.index("experts")
            fused.setdefault(".".join(parts[:k + 1] + parts[k + 2:]), {})[int(parts[k + 1])] = t
        else:
            fused[name] = t
    fused = {n: torch.stack([v[e] for e in range(arch.num_experts)]) if isinstance(v, dict) else v
             for n, v in fused.items()}
    original = model.state_dict()
    assert set(fused) == set(original)
    for name, t in fused.items():
        assert t.dtype == original[name].dtype and torch.equal(t, original[name]), name
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    back.load_state_dict(fused)
    ids = torch.randint(0, arch.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_planner_counts_the_sink_attention_unfused():
    """Sinks have no fused attention kernel (the torch core attention computes them unfused, per
    sequence): the planner keeps the scores for backward on both backends, as for Gemma-2."""
    from aipo_mp.planner import uses_flash_attention

    for backend in ("local", "te"):
        assert not uses_flash_attention(tiny_arch("gpt_oss"), backend)
        assert uses_flash_attention(tiny_arch("qwen3_moe"), backend)
