"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): the Llama layer plus a bias on the q, k and v projections
(not on o_proj or the MLP). The biases go into megatron's fused QKV bias with the same per-query-
group layout as the weights (`add_qkv_bias`). The small sizes (0.5B-3B) tie the embeddings.

Qwen2's optional sliding window (`use_sliding_window`, off in every released Qwen2.5 config) is
refused rather than ignored.
"""

from aipo_mp.config import ModelArch
from aipo_mp.errors import ConfigError
from aipo_mp.models import llama
from aipo_mp.models.family import QKV_BIAS_RULE, Family, SpecOptions, common_arch_fields, decoder_rules, output_rule


def arch_from_hf(hf: dict) -> ModelArch:
    if hf.get("use_sliding_window"):
        raise ConfigError("qwen2: use_sliding_window=true is not supported (released Qwen2.5 configs set it false)")
    return ModelArch(**common_arch_fields(hf, "qwen2"), qkv_bias=True)


def hf_config(arch: ModelArch) -> dict:
    cfg = llama.hf_config(arch)
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    for key in ("attention_bias", "mlp_bias"):
        cfg.pop(key)
    return cfg


def rules(arch: ModelArch):
    return decoder_rules(extra=(QKV_BIAS_RULE,)) + [output_rule(arch.tie_embeddings)]


FAMILY = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_type="qwen2",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=lambda arch: SpecOptions(),
    arch_flags=(("qkv_bias", True), ("qk_norm", False)),
    rules=rules,
)
