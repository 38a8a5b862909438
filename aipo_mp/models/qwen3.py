"""Qwen3 dense (Qwen3ForCausalLM): the Llama layer plus an RMSNorm over head_dim on every query
and key head before RoPE (q_norm, k_norm), mapped to megatron's `qk_layernorm`
(self_attention.q_layernorm / k_layernorm, the same names under the TE spec). head_dim is explicit
(Qwen3-32B: 128 while hidden / heads = 80); no biases.
"""

from aipo_mp.config import ModelArch
from aipo_mp.errors import ConfigError
from aipo_mp.models import llama
from aipo_mp.models.family import QK_NORM_RULES, Family, SpecOptions, common_arch_fields, decoder_rules, output_rule

HF_DEFAULT_HEAD_DIM = 128  # transformers' Qwen3Config default when config.json omits head_dim


def arch_from_hf(hf: dict) -> ModelArch:
    if hf.get("use_sliding_window"):
        raise ConfigError("qwen3: use_sliding_window=true is not supported (released Qwen3 configs set it false)")
    if hf.get("attention_bias"):
        raise ConfigError("qwen3: attention_bias=true is not supported (released Qwen3 configs have no biases)")
    fields = common_arch_fields({"head_dim": HF_DEFAULT_HEAD_DIM, **hf}, "qwen3")
    return ModelArch(**fields, qk_norm=True)


def hf_config(arch: ModelArch) -> dict:
    cfg = llama.hf_config(arch)
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False)
    cfg.pop("mlp_bias")
    return cfg


def rules(arch: ModelArch):
    return decoder_rules(extra=QK_NORM_RULES) + [output_rule(arch.tie_embeddings)]


FAMILY = Family(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_type="qwen3",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=lambda arch: SpecOptions(qk_norm=True),
    rules=rules,
    arch_flags=(("qkv_bias", False), ("qk_norm", True)),
)
