"""Llama-3 / 3.1 / 3.2 / 3.3 (LlamaForCausalLM): RMSNorm, SiLU-gated MLP, grouped-query attention,
RoPE; from 3.1 on with the `llama3` RoPE scaling (aipo_mp/models/rope.py)."""

from aipo_mp.config import ModelArch
from aipo_mp.models.family import Family, SpecOptions, common_arch_fields, decoder_rules, output_rule
from aipo_mp.models.rope import hf_rope_fields


def arch_from_hf(hf: dict) -> ModelArch:
    return ModelArch(**common_arch_fields(hf, "llama"))


def hf_config(arch: ModelArch) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        **hf_rope_fields(arch.rope_theta, arch.rope_scaling),
        "rms_norm_eps": arch.rms_norm_eps,
        "tie_word_embeddings": arch.tie_embeddings,
        "max_position_embeddings": arch.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_type="llama",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=lambda arch: SpecOptions(),
    rules=lambda arch: decoder_rules() + [output_rule(arch.tie_embeddings)],
)
