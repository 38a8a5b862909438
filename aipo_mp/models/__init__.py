"""Model families, registered by name and matched from an HF config.json.

Adding a family: one module with a `FAMILY` record, plus a line in FAMILIES.
"""

from __future__ import annotations

import json
from pathlib import Path

from aipo_mp.config import ModelArch
from aipo_mp.errors import CHECKPOINT_META as MEGATRON_META
from aipo_mp.errors import ConfigError
from aipo_mp.models import gemma2, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe
from aipo_mp.models.family import Family
from aipo_mp.models.rope import rope_scaling_errors

FAMILIES: dict[str, Family] = {
    f.name: f for f in (llama.FAMILY, mistral.FAMILY, gemma2.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                        qwen3_moe.FAMILY, mixtral.FAMILY)
}



def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.hf_architectures)


def family_for_hf_config(hf: dict) -> Family:
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.hf_architectures for a in archs) or hf.get("model_type") == fam.hf_model_type:
            return fam
    got = ", ".join(archs) or hf.get("model_type") or "none given"
    raise ConfigError(f"unsupported architecture {got}; supported: {', '.join(supported_architectures())}")


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def read_hf_config(directory: str | Path) -> dict:
    """config.json of an HF directory, or the HF config stored with an aipo_mp checkpoint."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"model directory not found: {d}")
    meta = d / MEGATRON_META
    if meta.exists():
        return json.loads(meta.read_text())["hf_config"]
    cfg = d / "config.json"
    if not cfg.exists():
        raise ConfigError(f"{d} has neither config.json (HF) nor {MEGATRON_META} (aipo_mp checkpoint)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg}: not valid JSON ({e.msg} at line {e.lineno})")


def arch_from_hf_config(hf: dict) -> ModelArch:
    fam = family_for_hf_config(hf)
    try:
        return fam.arch_from_hf(hf)
    except KeyError as e:
        raise ConfigError(f"{fam.name} config.json lacks the field {e.args[0]}")


def arch_from_dir(directory: str | Path) -> ModelArch:
    return arch_from_hf_config(read_hf_config(directory))


def arch_problems(arch: ModelArch) -> list[str]:
    """What a ModelArch (e.g. from configs/models/*.yaml) holds that its family cannot build."""
    if arch.family not in FAMILIES:
        return [f"model.arch.family={arch.family!r}: unknown; supported: {', '.join(FAMILIES)}"]
    want = dict(FAMILIES[arch.family].arch_flags)
    errors = [f"model.arch.{k}={getattr(arch, k)} does not fit family {arch.family}; set {k}: {str(v).lower()}"
              for k, v in want.items() if getattr(arch, k) != v]
    return errors + moe_arch_errors(arch, FAMILIES[arch.family].moe) + rope_scaling_errors(arch.rope_scaling)


def moe_arch_errors(arch: ModelArch, moe_family: bool) -> list[str]:
    if not moe_family:
        return [f"model.arch.num_experts={arch.num_experts}: family {arch.family} is dense; set 0 or choose "
                "a mixture-of-experts family (qwen3_moe, mixtral)"] if arch.num_experts else []
    errors = []
    if arch.num_experts < 2:
        errors.append(f"model.arch.num_experts={arch.num_experts}: family {arch.family} needs >= 2 experts")
    elif not 1 <= arch.num_experts_per_tok <= arch.num_experts:
        errors.append(f"model.arch.num_experts_per_tok={arch.num_experts_per_tok}: must be in [1, "
                      f"{arch.num_experts}] (the experts each token is routed to)")
    if arch.moe_intermediate_size < 1:
        errors.append("model.arch.moe_intermediate_size: set each expert's FFN width (> 0)")
    bad = [i for i in arch.dense_layers if not (isinstance(i, int) and 0 <= i < arch.num_layers)]
    if bad:
        errors.append(f"model.arch.dense_layers: {bad} are not layer indices in [0, {arch.num_layers})")
    return errors


def num_params(arch: ModelArch, active: bool = False) -> int:
    """Parameter count of the whole model (embeddings, layers, final norm, output layer).
    active: a mixture of experts counts only the experts one token uses (num_experts_per_tok)."""
    h, f, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    qkv_features = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * hd
    attn = h * qkv_features + arch.num_attention_heads * hd * h
    attn += qkv_features if arch.qkv_bias else 0
    attn += 2 * hd if arch.qk_norm else 0
    norms = get_family(arch.family).spec_options(arch).norms_per_layer * h
    moe_layers = arch.num_layers - len(arch.dense_layers) if arch.num_experts else 0
    experts = arch.num_experts_per_tok if active else arch.num_experts
    mlp = ((arch.num_layers - moe_layers) * 3 * h * f
           + moe_layers * (experts * 3 * h * arch.moe_intermediate_size + arch.num_experts * h))
    emb = arch.vocab_size * h
    return arch.num_layers * (attn + norms) + mlp + emb + h + (0 if arch.tie_embeddings else emb)


def hf_config_for(arch: ModelArch) -> dict:
    return get_family(arch.family).hf_config(arch)
