"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3-30B-A3B, Qwen3-235B-A22B. Qwen3 attention (q/k norms per
head, no biases) with a mixture-of-experts MLP: a softmax router over `num_experts`, the top
`num_experts_per_tok` experts per token, their weights renormalised when `norm_topk_prob`. Layers
listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP.
"""

from aipo_mp.config import ModelArch
from aipo_mp.models import qwen3
from aipo_mp.models.family import (
    DENSE_LAYERS,
    QK_NORM_RULES,
    Family,
    SpecOptions,
    decoder_rules,
    moe_rules,
    output_rule,
)


def dense_layers_of(hf: dict) -> list[int]:
    """transformers' rule: layer i is sparse when not in mlp_only_layers and (i + 1) % step == 0."""
    step, only = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or [])
    return [i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step]


def arch_from_hf(hf: dict) -> ModelArch:
    arch = qwen3.arch_from_hf(hf)
    arch.family = "qwen3_moe"
    arch.num_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]  # transformers 5 writes the latter
    arch.num_experts_per_tok = hf["num_experts_per_tok"]
    arch.moe_intermediate_size = hf["moe_intermediate_size"]
    arch.norm_topk_prob = bool(hf.get("norm_topk_prob", False))  # transformers' default
    arch.dense_layers = dense_layers_of(hf)
    return arch


def hf_config(arch: ModelArch) -> dict:
    cfg = qwen3.hf_config(arch)
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=arch.num_experts,
               num_experts_per_tok=arch.num_experts_per_tok, moe_intermediate_size=arch.moe_intermediate_size,
               norm_topk_prob=arch.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=list(arch.dense_layers),
               router_aux_loss_coef=0.0, output_router_logits=False)
    return cfg


def rules(arch: ModelArch):
    return (decoder_rules(extra=QK_NORM_RULES, mlp_layers=DENSE_LAYERS)
            + moe_rules("mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj"))
            + [output_rule(arch.tie_embeddings)])


FAMILY = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_type="qwen3_moe",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=lambda arch: SpecOptions(qk_norm=True),
    rules=rules,
    moe=True,
    arch_flags=(("qkv_bias", False), ("qk_norm", True)),
)
