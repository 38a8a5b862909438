"""Model-family tables without a process group: RoPE settings read from config.json (llama3
scaling, rope_parameters vs rope_scaling agreement, refusals), the HF mapping of every family
covers every parameter of megatron-core's Transformer Engine layer spec, and architecture
parameter counts equal the transformers models'."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from aipo_mp.config import ModelArch, config_from_dict
from aipo_mp.errors import ConfigError
from aipo_mp.models import FAMILIES, arch_from_hf_config, get_family, hf_config_for, num_params
from aipo_mp.models.build import te_layer_spec
from aipo_mp.models.family import NONE, SpecOptions
from aipo_mp.validate import validate
from tests.conftest import FAMILIES as OLD_FAMILIES
from tests.conftest import NEW_MODELS, ROOT, tiny_arch

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def llama_hf(**extra) -> dict:
    base = hf_config_for(tiny_arch("llama"))
    base.pop("rope_theta")
    return {**base, "rope_theta": 500000.0, **extra}


# ---------------------------------------------------------------------------------------------
# RoPE settings
# ---------------------------------------------------------------------------------------------


def test_llama3_scaling_is_read_from_either_field_and_both_when_they_agree():
    legacy = arch_from_hf_config(llama_hf(rope_scaling=dict(LLAMA31)))
    v5 = arch_from_hf_config(llama_hf(rope_parameters={**LLAMA31, "rope_theta": 500000.0}))
    both = arch_from_hf_config(llama_hf(rope_parameters={**LLAMA31, "rope_theta": 500000.0}, rope_scaling=dict(LLAMA31)))
    old_key = arch_from_hf_config(llama_hf(rope_scaling={**{k: v for k, v in LLAMA31.items() if k != "rope_type"},
                                                         "type": "llama3"}))
    assert legacy.rope_scaling == v5.rope_scaling == both.rope_scaling == old_key.rope_scaling == LLAMA31
    assert v5.rope_theta == 500000.0
    # Export writes what it read (transformers-5 rope_parameters, theta included).
    exported = hf_config_for(v5)
    assert exported["rope_parameters"] == {**LLAMA31, "rope_theta": 500000.0}
    assert arch_from_hf_config(exported) == v5


@pytest.mark.parametrize("extra, message", [
    # The case that used to convert silently as plain RoPE while transformers applied llama3.
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rope_scaling=dict(LLAMA31)),
     "rope_parameters (default RoPE) and rope_scaling (rope_type=llama3"),
    (dict(rope_parameters={**LLAMA31, "factor": 4.0}, rope_scaling=dict(LLAMA31)), "disagree"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling type 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "RoPE scaling type 'dynamic' is not supported"),
    (dict(rope_scaling={k: v for k, v in LLAMA31.items() if k != "high_freq_factor"}), "lacks high_freq_factor"),
    (dict(rope_scaling={**LLAMA31, "low_freq_factor": 4.0}), "must be below high_freq_factor"),
])
def test_rope_settings_refused_with_one_line(extra, message):
    with pytest.raises(ConfigError) as e:
        arch_from_hf_config(llama_hf(**extra))
    assert len(e.value.errors) == 1 and message in e.value.errors[0], e.value.errors


def test_yaml_arch_is_validated_before_any_process_group():
    def errors_of(**arch_fields) -> list[str]:
        cfg = config_from_dict({"model": {"arch": {**tiny_arch("llama").__dict__, **arch_fields}}})
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        return e.value.errors

    assert any("RoPE scaling type 'yarn'" in e for e in errors_of(rope_scaling={"rope_type": "yarn", "factor": 2}))
    assert any("qkv_bias" in e for e in errors_of(family="qwen2"))
    assert any("qk_norm" in e for e in errors_of(family="qwen3"))
    for name in NEW_MODELS + ("llama3_1_405b", "llama3_3_70b", "qwen2_5_72b", "qwen3_32b"):
        arch = tiny_arch(name) if name in NEW_MODELS else _model_arch(name)
        validate(config_from_dict({"model": {"arch": arch.__dict__}}))


def _model_arch(name: str) -> ModelArch:
    from aipo_mp.config import load_config
    from tests.conftest import ROOT

    return load_config(ROOT / "configs" / "models" / f"{name}.yaml").model.arch


def test_llama3_inverse_frequencies_equal_transformers():
    """Megatron's formula with the config's parameters gives transformers' inv_freq exactly, and
    the tiny Llama-3.1's scaling really changes them (original length 32)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from aipo_mp.models.rope import apply_rope_scaling

    for arch in (tiny_arch("llama3_1"), _model_arch("llama3_1_405b")):
        cfg = hf_config_for(arch)
        hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        holder = types.SimpleNamespace(rotary_pos_emb=RotaryEmbedding(arch.head_dim, 1.0, rotary_base=arch.rope_theta,
                                                                       use_cpu_initialization=True))
        plain = holder.rotary_pos_emb.inv_freq.clone()
        apply_rope_scaling(holder, arch.rope_scaling)
        assert torch.equal(holder.rotary_pos_emb.inv_freq, want)
        assert (plain != want).sum() >= arch.head_dim // 4


# ---------------------------------------------------------------------------------------------
# Transformer Engine parameter names
# ---------------------------------------------------------------------------------------------

# Parameters each module class creates (TE cannot be imported here, so its classes' parameters
# are listed by hand: TE's LayerNormLinear holds `weight` and the fused norm's `layer_norm_weight`
# (RMSNorm: no layer_norm_bias), its Linear `weight`, its RMSNorm `weight`; a `bias` only when the
# layer is built with bias=True). The local classes are the ones aipo_mp's specs use.
PARAMS_OF_CLASS = {
    "TELayerNormColumnParallelLinear": ("weight", "layer_norm_weight"),
    "TEColumnParallelLinear": ("weight",), "TERowParallelLinear": ("weight",), "TELinear": ("weight",),
    "ColumnParallelLinear": ("weight",), "RowParallelLinear": ("weight",),
    "RowParallelLinearWithPostNorm": ("weight", "post_norm.weight"),
    "TENorm": ("weight",), "RMSNorm": ("weight",), "ZeroCenteredRMSNorm": ("weight",),
    "TEDotProductAttention": (), "TorchCoreAttention": (), "IdentityOp": (),
}
LINEARS = {k for k in PARAMS_OF_CLASS if "Linear" in k}
TE_CLASSES = ("TEActivationOp", "TEColumnParallelGroupedLinear", "TEColumnParallelLinear", "TEDotProductAttention",
              "TELayerNormColumnParallelLinear", "TELinear", "TENorm", "TERowParallelGroupedLinear",
              "TERowParallelLinear", "TEFusedMLP")


@pytest.fixture
def te_spec_source(monkeypatch):
    """megatron-core's real gpt_layer_specs / TESpecProvider code, run with marker classes in
    place of Transformer Engine's modules (which need CUDA and TE to import)."""
    import importlib

    from megatron.core.models.gpt import gpt_layer_specs

    fake_te = types.ModuleType("megatron.core.extensions.transformer_engine")
    for name in TE_CLASSES:
        setattr(fake_te, name, type(name, (), {}))
    monkeypatch.setitem(sys.modules, "megatron.core.extensions.transformer_engine", fake_te)
    monkeypatch.delitem(sys.modules, "megatron.core.extensions.transformer_engine_spec_provider", raising=False)
    provider = importlib.import_module("megatron.core.extensions.transformer_engine_spec_provider")
    monkeypatch.setattr(provider, "is_te_min_version", lambda version: True)  # a current TE
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider, raising=False)
    yield
    sys.modules.pop("megatron.core.extensions.transformer_engine_spec_provider", None)


def spec_param_names(spec, arch: ModelArch, prefix: str = "") -> list[str]:
    """Parameter names (relative to a layer) of a TransformerLayer ModuleSpec tree."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    names = []
    for field, sub in vars(spec.submodules).items():
        if field.endswith("_bda") or field == "sharded_state_dict_keys_map" or sub is None:
            continue
        if isinstance(sub, ModuleSpec) and sub.submodules is not None:
            names += spec_param_names(sub, arch, prefix + field + ".")
            continue
        cls = sub.module if isinstance(sub, ModuleSpec) else sub
        if cls.__name__ not in PARAMS_OF_CLASS:
            raise AssertionError(f"{prefix}{field}: module {cls.__name__} has no parameter list in this test")
        params = list(PARAMS_OF_CLASS[cls.__name__])
        if cls.__name__ in LINEARS and field == "linear_qkv" and arch.qkv_bias:
            params.append("bias")  # megatron: bias=add_bias_linear or add_qkv_bias
        names += [f"{prefix}{field}.{p}" for p in params]
    return names


@pytest.mark.parametrize("name", OLD_FAMILIES + NEW_MODELS)
def test_mapping_covers_every_parameter_of_the_te_layer_spec(te_spec_source, name):
    arch = tiny_arch(name)
    family = get_family(arch.family)
    opts: SpecOptions = family.spec_options(arch)
    layer = spec_param_names(te_layer_spec(opts), arch)
    fused = {"self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"}
    if arch.family == "gemma2":  # soft-capping/post-norms: the TE backend keeps the local layer
        assert not fused & set(layer)
    else:
        assert fused <= set(layer), layer
        assert ("self_attention.q_layernorm.weight" in layer) == arch.qk_norm
        assert ("self_attention.linear_qkv.bias" in layer) == arch.qkv_bias
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    names += [f"decoder.layers.{i}.{p}" for i in range(arch.num_layers) for p in layer]
    hf_names = set(family.hf_names(arch))
    for gname in names:
        rule, index = family.rule_for(arch, gname)  # KeyError before this mapping had TE names
        assert set(rule.hf_at(index)) <= hf_names, gname  # reads tensors a checkpoint holds
        if "layer_norm_weight" in gname:
            assert rule.te_alias and rule.split == NONE  # replicated over TP, like the local norms
            local = gname.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
            local = local.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
            assert family.rule_for(arch, local)[0].hf == rule.hf


def test_te_aliases_add_no_hf_tensors():
    for name in OLD_FAMILIES + NEW_MODELS:
        arch = tiny_arch(name)
        names = get_family(arch.family).hf_names(arch)
        assert len(names) == len(set(names)), name


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_MODELS)
def test_new_families_parameter_count_and_names_equal_transformers(name):
    from aipo_mp.testing.hf_build import hf_model_from_arch

    arch = tiny_arch(name)
    model = hf_model_from_arch(arch)
    assert num_params(arch) == sum(p.numel() for p in model.parameters())
    held = set(model.state_dict()) - ({"lm_head.weight"} if arch.tie_embeddings else set())
    assert set(get_family(arch.family).hf_names(arch)) == held
    assert arch_from_hf_config(hf_config_for(arch)) == arch


def test_every_family_is_registered():
    assert set(FAMILIES) == {"llama", "mistral", "gemma2", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3",
                             "gpt_oss"}
    assert {get_family(tiny_arch(n).family).name for n in NEW_MODELS} == {"llama", "qwen2", "qwen3"}


# ---------------------------------------------------------------------------------------------
# Recipes of the new families follow the planner
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["aipo_llama3_3_70b", "aipo_llama3_1_405b"])
def test_recipe_layout_is_the_planners_recommendation(recipe):
    from aipo_mp import planner
    from aipo_mp.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "recipes" / f"{recipe}.yaml")
    gpus = cfg.cluster.nodes * cfg.cluster.nproc_per_node
    top = planner.plan(cfg.model.arch, gpus, "h100-80gb")[0]
    par = cfg.parallel
    assert top.fits
    assert (top.layout.tp, top.layout.pp, top.layout.vpp, top.layout.dp) == (par.tp, par.pp, par.vpp, gpus // (par.tp * par.pp))
    assert top.recompute == cfg.train.recompute


def test_405b_needs_a_pipeline_depth_that_divides_126_layers():
    """README: on 16 or 32 full nodes (power-of-two GPUs) only pp <= 2 divides 126 layers and nothing
    fits; the planner's choice for 16 nodes uses 14 of them (tp 8 x pp 14)."""
    from aipo_mp import planner

    arch = _model_arch("llama3_1_405b")
    for gpus in (128, 256):
        rows = planner.plan(arch, gpus, "h100-80gb")
        assert rows and not any(r.fits for r in rows) and {r.layout.pp for r in rows} <= {1, 2}
    top = planner.plan(arch, 112, "h100-80gb")[0]
    assert top.fits and (top.layout.tp, top.layout.pp, top.layout.dp, top.recompute) == (8, 14, 1, "full")


@pytest.mark.parametrize("name, published_billions", [
    ("llama3_1_405b", 405.9), ("llama3_3_70b", 70.6), ("qwen2_5_72b", 72.7), ("qwen3_32b", 32.8)])
def test_published_parameter_counts(name, published_billions):
    """The model cards' parameter counts (rounded to 0.1B) follow from the configs' shapes."""
    assert abs(num_params(_model_arch(name)) / 1e9 - published_billions) < 0.05


# ---------------------------------------------------------------------------------------------
# Mixtures of experts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_parameter_counts_and_saved_names_equal_transformers(name, tmp_path):
    """Total and active counts, and the per-expert names transformers writes, from the table."""
    from safetensors import safe_open

    from aipo_mp.testing.hf_build import hf_model_from_arch

    arch = tiny_arch(name)
    model = hf_model_from_arch(arch)
    assert num_params(arch) == sum(p.numel() for p in model.parameters())
    moe_layers = arch.num_layers - len(arch.dense_layers)
    unused = (arch.num_experts - arch.num_experts_per_tok) * 3 * arch.hidden_size * arch.moe_intermediate_size
    assert num_params(arch) - num_params(arch, active=True) == moe_layers * unused
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert set(get_family(arch.family).hf_names(arch)) == saved
    assert arch_from_hf_config(hf_config_for(arch)) == arch


def test_qwen3_moe_dense_layers_follow_transformers_rule():
    from aipo_mp.models.qwen3_moe import dense_layers_of

    assert dense_layers_of({"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}) == [0, 2, 3, 4]
    assert dense_layers_of({"num_hidden_layers": 3}) == []


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.ep=3"], "parallel.ep=3 does not divide the 4 experts; choose ep from [1, 2, 4]"),
    (["parallel.etp=5"], "parallel.etp=5 does not divide the experts' FFN width 64"),
    (["parallel.tp=2"], "needs sequence parallelism"),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.ep=1 with parallel.tp=2 needs parallel.etp=2"),
    (["model.arch.num_experts_per_tok=5"], "model.arch.num_experts_per_tok=5: must be in [1, 4]"),
    (["model.arch.dense_layers=[7]"], "model.arch.dense_layers: [7] are not layer indices"),
])
def test_moe_layouts_that_do_not_divide_are_refused(overrides, fragment):
    from aipo_mp.config import load_config
    from aipo_mp.errors import ConfigError
    from aipo_mp.validate import validate

    cfg = load_config(ROOT / "configs" / "models" / "tiny_qwen3_moe.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=4)
    assert any(fragment in line for line in e.value.errors), e.value.errors


def test_expert_parallelism_of_a_dense_model_and_an_expert_mesh_that_does_not_fit_are_refused():
    from aipo_mp.config import load_config
    from aipo_mp.errors import ConfigError
    from aipo_mp.validate import validate

    dense = load_config(ROOT / "configs" / "models" / "tiny_llama.yaml", ["parallel.ep=2"])
    with pytest.raises(ConfigError, match="expert parallelism needs a mixture-of-experts model"):
        validate(dense, world_size=2)
    moe = load_config(ROOT / "configs" / "models" / "tiny_mixtral.yaml", ["parallel.ep=4"])
    with pytest.raises(ConfigError, match="world size 2 is not a multiple of etp x ep x pp = 4"):
        validate(moe, world_size=2)
    validate(load_config(ROOT / "configs" / "models" / "tiny_mixtral.yaml", ["parallel.ep=2"]), world_size=2)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_mapping_covers_the_te_moe_layer_spec(te_spec_source, name):
    """On GPUs an MoE layer is megatron's TE spec with grouped GEMM experts (TEGroupedMLP, one
    `weight{e}` per local expert) and a separate pre-MLP TENorm; every such parameter maps to the
    HF tensors the local spec's SequentialMLP maps (same checkpoint, either backend)."""
    arch = tiny_arch(name)
    family = get_family(arch.family)
    spec = te_layer_spec(family.spec_options(arch), arch.num_experts)
    moe = spec.submodules.mlp
    assert moe.module.__name__ == "MoELayer"
    experts = moe.submodules.experts
    assert experts.module.__name__ == "TEGroupedMLP"
    assert experts.submodules.linear_fc1.__name__ == "TEColumnParallelGroupedLinear"
    assert experts.submodules.linear_fc2.__name__ == "TERowParallelGroupedLinear"
    assert spec.submodules.pre_mlp_layernorm.__name__ == "TENorm"  # not fused into fc1 on MoE layers
    layer = next(i for i in range(arch.num_layers) if i not in arch.dense_layers)
    hf_names = set(family.hf_names(arch))
    L = f"decoder.layers.{layer}."
    for e in range(arch.num_experts):
        for fc in (1, 2):
            te_rule, te_index = family.rule_for(arch, f"{L}mlp.experts.linear_fc{fc}.weight{e}")
            local_rule, local_index = family.rule_for(arch, f"{L}mlp.experts.local_experts.{e}.linear_fc{fc}.weight")
            assert te_rule.te_alias and te_rule.expert and te_index == local_index == {"i": layer, "e": e}
            assert te_rule.hf_at(te_index) == local_rule.hf_at(local_index)
            assert set(te_rule.hf_at(te_index)) <= hf_names
    for gname in (f"{L}mlp.router.weight", f"{L}pre_mlp_layernorm.weight"):
        rule, index = family.rule_for(arch, gname)
        assert set(rule.hf_at(index)) <= hf_names and not rule.te_alias


def test_local_expert_names_of_both_backends_are_recognised():
    from aipo_mp.models.build import LOCAL_EXPERT

    local = LOCAL_EXPERT.match("mlp.experts.local_experts.1.linear_fc1.weight")
    grouped = LOCAL_EXPERT.match("mlp.experts.linear_fc2.weight1")
    assert local.group(1, 2, 3) == ("mlp.experts.local_experts.", "1", ".linear_fc1.weight")
    assert grouped.group(4, 5, 6) == ("mlp.experts.linear_fc2.weight", "1", "")
    assert LOCAL_EXPERT.match("mlp.linear_fc1.weight") is None and LOCAL_EXPERT.match("mlp.router.weight") is None


def test_resume_across_the_expert_parallel_line_is_refused(tmp_path):
    """Weights load at any ep; the optimizer state is chained (dense + experts) only when ep > 1."""
    from aipo_mp.config import load_config
    from aipo_mp.errors import CheckpointError
    from aipo_mp.training.run_checkpoints import check_expert_layout, layout_dict

    ep2 = load_config(ROOT / "configs" / "models" / "tiny_mixtral.yaml", ["parallel.ep=2"])
    ep4 = load_config(ROOT / "configs" / "models" / "tiny_mixtral.yaml", ["parallel.ep=4"])
    ep1 = load_config(ROOT / "configs" / "models" / "tiny_mixtral.yaml")
    check_expert_layout(layout_dict(ep2), ep4, tmp_path)
    with pytest.raises(CheckpointError, match=r"saved at parallel.ep=2; its optimizer state resumes only at "
                                                     r"parallel.ep > 1.*model.path="):
        check_expert_layout(layout_dict(ep2), ep1, tmp_path)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3
# ---------------------------------------------------------------------------------------------


def test_deepseek_v3_names_shapes_and_config_equal_transformers(tmp_path):
    """The table names exactly what transformers saves (per-expert layout, the expert bias, the
    shared expert, latent attention), the shape table matches every saved shape, and the exported
    config.json reads back to the same architecture with vLLM's routing keys."""
    from safetensors import safe_open

    from aipo_mp.models.deepseek_v3 import expected_shapes
    from aipo_mp.testing.hf_build import hf_model_from_arch

    arch = tiny_arch("deepseek_v3")
    hf_model_from_arch(arch).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    names = get_family("deepseek_v3").hf_names(arch)
    assert set(names) == set(saved) and len(names) == len(saved)
    assert expected_shapes(arch, names) == saved
    exported = hf_config_for(arch)
    assert (exported["topk_method"], exported["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert arch_from_hf_config(exported) == arch
    assert arch_from_hf_config({**exported, "rope_parameters": None,
                                "rope_scaling": {**exported["rope_parameters"], "type": "yarn"}}) == arch


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "RoPE type 'default' is not supported"),
    ({"rope_interleave": False}, "rope_interleave=false"),
    ({"norm_topk_prob": False}, "norm_topk_prob=false"),
    ({"topk_method": "greedy"}, "topk_method='greedy'"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
])
def test_deepseek_v3_configs_megatron_cannot_reproduce_are_refused(change, message):
    hf = {**hf_config_for(tiny_arch("deepseek_v3")), **change}
    with pytest.raises(ConfigError, match=message):
        arch_from_hf_config(hf)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.arch.num_experts_per_tok=3"], "must be 2 x topk_group (2)"),
    (["model.arch.n_group=3"], "n_group must divide the 8 experts"),
    (["model.arch.dense_layers=[1]"], "deepseek_v3's dense layers are the first k"),
    (["model.arch.yarn=null"], "model.arch.yarn: deepseek_v3 needs its yarn RoPE scaling"),
    (["parallel.tp=4", "parallel.sequence_parallel=true", "parallel.etp=4", "model.arch.q_lora_rank=66"],
     "parallel.tp=4 does not divide the latent attention's q_lora_rank (66)"),
])
def test_deepseek_v3_archs_and_layouts_that_do_not_fit_are_refused(overrides, fragment):
    from aipo_mp.config import load_config

    cfg = load_config(ROOT / "configs" / "models" / "tiny_deepseek_v3.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=4)
    assert any(fragment in line for line in e.value.errors), e.value.errors


def test_deepseek_v3_multi_token_prediction_layer_is_what_import_drops():
    family, arch = get_family("deepseek_v3"), tiny_arch("deepseek_v3")
    assert family.dropped_on_import(arch, "model.layers.3.eh_proj.weight")
    assert family.dropped_on_import(arch, "model.layers.3.mlp.experts.5.up_proj.weight")
    assert not any(family.dropped_on_import(arch, n) for n in family.hf_names(arch))


def test_deepseek_v3_671b_config_has_the_published_sizes_and_validates():
    """configs/models/deepseek_v3_671b.yaml: the sizes equal transformers' DeepseekV3Config
    defaults (DeepSeek-V3's published config.json), it reads back through config.json, and an
    8-GPU-node layout (TP8 x EP8 on 64 GPUs) validates."""
    from transformers import DeepseekV3Config

    from aipo_mp.config import load_config

    arch = _model_arch("deepseek_v3_671b")
    exported, published = hf_config_for(arch), DeepseekV3Config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                "topk_group", "num_experts_per_tok", "first_k_dense_replace", "rms_norm_eps"):
        assert exported[key] == getattr(published, key), key
    assert arch_from_hf_config(exported) == arch
    cfg = load_config(ROOT / "configs" / "models" / "deepseek_v3_671b.yaml",
                      ["parallel.tp=8", "parallel.ep=8", "parallel.sequence_parallel=true"])
    validate(cfg, world_size=64)


@pytest.mark.parametrize("change", [{}, {"q_lora_rank": 0}, {"shared_expert_intermediate_size": 64}])
def test_deepseek_v3_parameter_counts_equal_transformers(change):
    """num_params of latent attention (low-rank or direct queries), the shared expert (1 or 2 x
    moe_intermediate_size), the router and the dense first layers equals the parameters of
    transformers' DeepseekV3ForCausalLM built from DeepseekV3Config at tiny sizes. The expert bias
    is a buffer on both sides (not counted); transformers' model has no multi-token-prediction
    layer, and neither does num_params (import drops it)."""
    import dataclasses

    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    arch = dataclasses.replace(tiny_arch("deepseek_v3"), **change)
    hf = hf_config_for(arch)
    config = DeepseekV3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    model = DeepseekV3ForCausalLM(config)
    assert num_params(arch) == sum(p.numel() for p in model.parameters())
    moe_layers = arch.num_layers - len(arch.dense_layers)
    unused = (arch.num_experts - arch.num_experts_per_tok) * 3 * arch.hidden_size * arch.moe_intermediate_size
    assert num_params(arch) - num_params(arch, active=True) == moe_layers * unused


def test_deepseek_v3_671b_parameter_count_is_the_published_one():
    """DeepSeek-V3 publishes 671B total (685B on the hub includes the 14B multi-token-prediction
    module, which import drops) and 37B activated per token."""
    arch = _model_arch("deepseek_v3_671b")
    assert abs(num_params(arch) / 671e9 - 1) < 0.01
    assert abs(num_params(arch, active=True) / 37e9 - 1) < 0.03
