"""Mistral (MistralForCausalLM): Mistral-Nemo-2407 (head_dim 128 != hidden/heads = 160) and
Mistral-Large-2407. Same layers as Llama; an optional sliding window applies to every layer."""

from aipo_mp.config import ModelArch
from aipo_mp.models import llama
from aipo_mp.models.family import Family, SpecOptions, common_arch_fields, decoder_rules, output_rule


def arch_from_hf(hf: dict) -> ModelArch:
    return ModelArch(**common_arch_fields(hf, "mistral"), sliding_window=hf.get("sliding_window"))


def hf_config(arch: ModelArch) -> dict:
    cfg = llama.hf_config(arch)
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=arch.sliding_window)
    for key in ("attention_bias", "mlp_bias"):
        cfg.pop(key)
    return cfg


def spec_options(arch: ModelArch) -> SpecOptions:
    return SpecOptions(window_size=arch.sliding_window)


FAMILY = Family(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_type="mistral",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=spec_options,
    rules=lambda arch: decoder_rules() + [output_rule(arch.tie_embeddings)],
)
