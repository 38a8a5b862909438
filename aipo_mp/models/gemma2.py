"""Gemma-2 (Gemma2ForCausalLM). Differences from Llama, all honoured:
- RMSNorm scales by (1 + w), computed in fp32; four norms per layer (input, post-attention,
  pre-feed-forward, post-feed-forward); the post norms wrap the output projections.
- attention scores scaled by query_pre_attn_scalar^-0.5 and soft-capped (50·tanh(s/50));
  a sliding window on the layers HF marks "sliding_attention" (even 0-based indices by default).
- embeddings multiplied by sqrt(hidden_size) in the model dtype; final logits soft-capped.
- GELU (tanh approximation) gated MLP; tied input/output embeddings.
"""

import math

from aipo_mp.config import ModelArch
from aipo_mp.models.family import Family, Rule, SpecOptions, common_arch_fields, decoder_rules, output_rule
from aipo_mp.models.rope import hf_rope_fields


def default_layer_types(num_layers: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]


def arch_from_hf(hf: dict) -> ModelArch:
    fields = common_arch_fields(hf, "gemma2")
    fields["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    return ModelArch(
        **fields,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", fields["head_dim"])),
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window"),
        layer_types=list(hf.get("layer_types") or default_layer_types(fields["num_layers"])),
    )


def hf_config(arch: ModelArch) -> dict:
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
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
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": int(arch.query_pre_attn_scalar or arch.head_dim),
        "attn_logit_softcapping": arch.attn_logit_softcapping,
        "final_logit_softcapping": arch.final_logit_softcapping,
        "sliding_window": arch.sliding_window,
        "layer_types": arch.layer_types or default_layer_types(arch.num_layers),
        "attention_bias": False,
    }


def spec_options(arch: ModelArch) -> SpecOptions:
    types = arch.layer_types or default_layer_types(arch.num_layers)
    return SpecOptions(
        zero_centered_norm=True,
        post_norms=True,
        activation="gelu_tanh",
        attn_logit_softcapping=arch.attn_logit_softcapping,
        window_size=arch.sliding_window,
        sliding_layers=tuple(i + 1 for i, t in enumerate(types) if t == "sliding_attention"),
        softmax_scale=(arch.query_pre_attn_scalar or arch.head_dim) ** -0.5,
        embedding_scale=math.sqrt(arch.hidden_size),
        final_logit_softcapping=arch.final_logit_softcapping,
    )


L, H = "decoder.layers.{i}.", "model.layers.{i}."
POST_NORMS = (
    Rule(L + "self_attention.linear_proj.post_norm.weight", (H + "post_attention_layernorm.weight",)),
    Rule(L + "mlp.linear_fc2.post_norm.weight", (H + "post_feedforward_layernorm.weight",)),
)

FAMILY = Family(
    name="gemma2",
    hf_architectures=("Gemma2ForCausalLM",),
    hf_model_type="gemma2",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=spec_options,
    rules=lambda arch: decoder_rules("pre_feedforward_layernorm", POST_NORMS) + [output_rule(arch.tie_embeddings)],
)
