"""Model families, registered by name and matched from an HF config.json.

Adding a family: one module with a `FAMILY` record, plus a line in FAMILIES.
"""

from __future__ import annotations

from pathlib import Path

from aipo_mp.config import ModelArch
from aipo_mp.errors import CHECKPOINT_META as MEGATRON_META
from aipo_mp.errors import ConfigError
from aipo_mp.models import deepseek_v3, gemma2, gpt_oss, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe
from aipo_mp.models.family import Family
from aipo_mp.models.rope import rope_scaling_errors

FAMILIES: dict[str, Family] = {
    f.name: f for f in (llama.FAMILY, mistral.FAMILY, gemma2.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                        qwen3_moe.FAMILY, mixtral.FAMILY, deepseek_v3.FAMILY, gpt_oss.FAMILY)
}


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.hf_architectures)


def family_for_hf_config(hf: dict) -> Family:
    if not isinstance(hf, dict):  # every file reader checks this; a caller's own dict might not be one
        raise ConfigError(f"the HF config holds a JSON {type(hf).__name__}, not an object; {HF_CONFIG_FIX}")
    archs = hf.get("architectures") or []
    if isinstance(archs, str) or not isinstance(archs, list):
        archs = [str(archs)]
    for fam in FAMILIES.values():
        if any(a in fam.hf_architectures for a in archs) or hf.get("model_type") == fam.hf_model_type:
            return fam
    got = ", ".join(archs) or hf.get("model_type") or "none given"
    raise ConfigError(f"unsupported architecture {got}; supported: {', '.join(supported_architectures())}")


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# What every reader of aipo_checkpoint.json relies on, with its JSON type.
CHECKPOINT_META_KEYS = {"format": str, "hf_config": dict, "layout": dict, "dtype": str, "num_params": int}
LAYOUT_KEYS = {"tp": int, "pp": int}
CHECKPOINT_META_FIX = "the checkpoint's description is damaged: restore it, or convert the checkpoint again"
HF_CONFIG_FIX = "restore the model's config.json (copy it again with the weights)"


def read_checkpoint_meta_file(meta: str | Path) -> dict:
    """aipo_checkpoint.json through the one JSON reader: an object with format, hf_config and
    layout, or one line naming the file and what is wrong."""
    from aipo_mp.runtime.json_files import check_object, read_json_object

    data = read_json_object(meta, MEGATRON_META, CHECKPOINT_META_KEYS, CHECKPOINT_META_FIX)
    check_object(data["layout"], meta, f"{MEGATRON_META}'s layout", LAYOUT_KEYS, CHECKPOINT_META_FIX)
    return data


def read_hf_config(directory: str | Path) -> dict:
    """config.json of an HF directory, or the HF config stored with an aipo_mp checkpoint."""
    from aipo_mp.runtime.json_files import read_json_object

    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"model directory not found: {d}")
    meta = d / MEGATRON_META
    if meta.exists():
        return read_checkpoint_meta_file(meta)["hf_config"]
    cfg = d / "config.json"
    if not cfg.exists():
        raise ConfigError(f"{d} has neither config.json (HF) nor {MEGATRON_META} (aipo_mp checkpoint)")
    return read_json_object(cfg, "config.json", fix=HF_CONFIG_FIX)


def arch_from_hf_config(hf: dict) -> ModelArch:
    fam = family_for_hf_config(hf)
    try:
        return fam.arch_from_hf(hf)
    except KeyError as e:
        raise ConfigError(f"{fam.name} config.json lacks the field {e.args[0]}; {HF_CONFIG_FIX}") from None
    except (TypeError, ValueError, AttributeError) as e:  # e.g. "hidden_size": "big" or null
        raise ConfigError(f"{fam.name} config.json holds a value of the wrong type ({e}); {HF_CONFIG_FIX}") from None


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
    active: a mixture of experts counts only the experts one token uses (num_experts_per_tok);
    routers and shared experts are always active. Buffers (DeepSeek-V3's expert bias) are not
    parameters; neither is the multi-token-prediction layer of DeepSeek-V3 releases (not imported)."""
    h, f, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    if arch.kv_lora_rank:  # DeepSeek-V3's multi-head latent attention (aipo_mp/models/deepseek_v3.py)
        a, ql, kvl = arch.num_attention_heads, arch.q_lora_rank, arch.kv_lora_rank
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        query = h * ql + ql + a * qk * ql if ql else a * qk * h  # q_a_proj, q_a_layernorm, q_b_proj | q_proj
        kv = h * (kvl + arch.qk_rope_head_dim) + kvl + a * (arch.qk_nope_head_dim + arch.v_head_dim) * kvl
        attn = query + kv + h * a * arch.v_head_dim  # ... kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; o_proj
    else:
        qkv_features = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * hd
        attn = h * qkv_features + arch.num_attention_heads * hd * h
        attn += qkv_features if arch.qkv_bias else 0
        attn += 2 * hd if arch.qk_norm else 0
    norms = get_family(arch.family).spec_options(arch).norms_per_layer * h
    moe_layers = arch.num_layers - len(arch.dense_layers) if arch.num_experts else 0
    experts = arch.num_experts_per_tok if active else arch.num_experts
    shared = 3 * h * arch.shared_expert_intermediate_size  # DeepSeek-V3: gate, up, down of the shared expert
    mlp = ((arch.num_layers - moe_layers) * 3 * h * f
           + moe_layers * (experts * 3 * h * arch.moe_intermediate_size + arch.num_experts * h + shared))
    emb = arch.vocab_size * h
    extra = get_family(arch.family).extra_params  # e.g. gpt-oss's sinks and linear biases
    return (arch.num_layers * (attn + norms) + mlp + emb + h + (0 if arch.tie_embeddings else emb)
            + (extra(arch, active) if extra else 0))


def hf_config_for(arch: ModelArch) -> dict:
    return get_family(arch.family).hf_config(arch)
