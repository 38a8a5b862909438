"""Mixtral (MixtralForCausalLM): Mixtral-8x7B, Mixtral-8x22B. Mistral attention with a
mixture-of-experts MLP in every layer: a softmax router over `num_local_experts`, the top
`num_experts_per_tok` (2) experts per token with their weights renormalised. The experts' width is
the config's `intermediate_size`; HF names them block_sparse_moe.experts.j.{w1, w3, w2} (gate, up, down).
"""

from aipo_mp.config import ModelArch
from aipo_mp.errors import ConfigError
from aipo_mp.models import mistral
from aipo_mp.models.family import DENSE_LAYERS, Family, decoder_rules, moe_rules, output_rule


def arch_from_hf(hf: dict) -> ModelArch:
    if hf.get("router_jitter_noise"):
        raise ConfigError(f"mixtral: router_jitter_noise={hf['router_jitter_noise']} is not supported (it adds "
                          "random noise to routing in training; released Mixtral configs set 0.0)")
    arch = mistral.arch_from_hf(hf)
    arch.family = "mixtral"
    arch.num_experts = hf["num_local_experts"]
    arch.num_experts_per_tok = hf["num_experts_per_tok"]
    arch.moe_intermediate_size = arch.intermediate_size
    arch.norm_topk_prob = True
    return arch


def hf_config(arch: ModelArch) -> dict:
    cfg = mistral.hf_config(arch)
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=arch.num_experts,
               num_experts_per_tok=arch.num_experts_per_tok, intermediate_size=arch.moe_intermediate_size,
               router_jitter_noise=0.0, router_aux_loss_coef=0.0, output_router_logits=False)
    return cfg


def rules(arch: ModelArch):
    return (decoder_rules(mlp_layers=DENSE_LAYERS)
            + moe_rules("block_sparse_moe.gate", "block_sparse_moe.experts", ("w1", "w3", "w2"))
            + [output_rule(arch.tie_embeddings)])


FAMILY = Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_type="mixtral",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=mistral.spec_options,
    rules=rules,
    moe=True,
)
