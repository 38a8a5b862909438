"""RoPE settings of an HF config: the base (theta) and the scaling Llama-3.1+ uses (`llama3`).

config.json files carry the scaling as `rope_scaling` (older transformers), `rope_parameters`
(transformers >= 5, which also holds rope_theta), or both. Both are read; when both are present
they must agree, because transformers applies `rope_scaling` when it is set and a silent
disagreement converts a model that no longer matches its reference. Scaling types other than
`llama3` are refused with one line that names them.

Megatron's RotaryEmbedding implements the llama3 formula (`_apply_scaling`) but hard-codes the
low/high frequency factors and the original length of Llama-3.1; `apply_rope_scaling` calls the
same function with the config's values.
"""

from __future__ import annotations

from typing import Optional

from aipo_mp.errors import ConfigError

LLAMA3 = "llama3"
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SUPPORTED = ("default", LLAMA3)


def _kind(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def _normalized(params: Optional[dict], where: str) -> Optional[dict]:
    """{rope_type: llama3, factor, ...} for llama3, None for plain RoPE; ConfigError otherwise."""
    if not params:
        return None
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping, got {params!r}")
    kind = _kind(params)
    if kind == "default":
        return None
    if kind != LLAMA3:
        raise ConfigError(f"{where}: RoPE scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    missing = [k for k in LLAMA3_FIELDS if params.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: llama3 RoPE scaling lacks {', '.join(missing)}")
    out = {"rope_type": LLAMA3, **{k: float(params[k]) for k in LLAMA3_FIELDS[:3]},
           "original_max_position_embeddings": int(params["original_max_position_embeddings"])}
    errors = rope_scaling_errors(out, where)
    if errors:
        raise ConfigError(errors[0])
    return out


def rope_scaling_errors(scaling: Optional[dict], where: str = "model.arch.rope_scaling") -> list[str]:
    """Problems of a normalized scaling dict (as stored in ModelArch.rope_scaling)."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict) or _kind(scaling) != LLAMA3:
        got = _kind(scaling) if isinstance(scaling, dict) else repr(scaling)
        return [f"{where}: RoPE scaling type {got!r} is not supported; supported: {', '.join(SUPPORTED)}"]
    missing = [k for k in LLAMA3_FIELDS if scaling.get(k) is None]
    if missing:
        return [f"{where}: llama3 RoPE scaling lacks {', '.join(missing)}"]
    unknown = sorted(set(scaling) - {"rope_type", "type", "rope_theta", *LLAMA3_FIELDS})
    if unknown:
        return [f"{where}: unknown llama3 RoPE scaling field(s) {', '.join(unknown)}; valid: {', '.join(LLAMA3_FIELDS)}"]
    if scaling["factor"] < 1:
        return [f"{where}: factor={scaling['factor']} must be >= 1"]
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        return [f"{where}: low_freq_factor ({scaling['low_freq_factor']}) must be below high_freq_factor "
                f"({scaling['high_freq_factor']})"]
    if scaling["original_max_position_embeddings"] < 1:
        return [f"{where}: original_max_position_embeddings must be >= 1"]
    return []


def rope_theta_of(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def rope_scaling_of(hf: dict) -> Optional[dict]:
    """The scaling of an HF config.json (None: plain RoPE), refusing a rope_parameters /
    rope_scaling pair that disagrees."""
    parameters = _normalized(hf.get("rope_parameters"), "config.json rope_parameters")
    scaling = _normalized(hf.get("rope_scaling"), "config.json rope_scaling")
    if hf.get("rope_parameters") and hf.get("rope_scaling") and parameters != scaling:
        raise ConfigError(
            f"config.json: rope_parameters ({_describe(parameters)}) and rope_scaling ({_describe(scaling)}) "
            "disagree (transformers would apply rope_scaling); make them equal or remove one"
        )
    return parameters if hf.get("rope_parameters") else scaling


def _describe(scaling: Optional[dict]) -> str:
    if scaling is None:
        return "default RoPE"
    return ", ".join(f"{k}={v}" for k, v in scaling.items())


def hf_rope_fields(rope_theta: float, scaling: Optional[dict]) -> dict:
    """config.json fields for export: rope_theta, and with scaling the transformers-5
    `rope_parameters` (which vLLM and transformers read)."""
    fields = {"rope_theta": rope_theta}
    if scaling:
        fields["rope_parameters"] = {"rope_type": LLAMA3, **{k: scaling[k] for k in LLAMA3_FIELDS},
                                     "rope_theta": rope_theta}
    return fields


def apply_rope_scaling(model, scaling: Optional[dict]) -> None:
    """Rescale the inverse frequencies of a GPTModel's RotaryEmbedding with megatron's own llama3
    formula and the config's parameters (GPTModel passes only the factor)."""
    if not scaling:
        return
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(rotary.inv_freq, **{k: scaling[k] for k in LLAMA3_FIELDS})


# ---------------------------------------------------------------------------------------------
# yarn, as transformers computes it for gpt-oss (aipo_mp/models/gpt_oss.py)
# ---------------------------------------------------------------------------------------------


def yarn_attention_factor(yarn: dict) -> float:
    """The factor transformers multiplies cos and sin by (0.1·ln(factor) + 1, or 1 when factor <= 1).
    Scaling both q and k by it scales every attention score by its square."""
    import math

    factor = yarn["factor"]
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, yarn: dict):
    """transformers' yarn inverse frequencies (fp32, the same operations in the same order):
    interpolated by `factor` below the beta_slow rotations, extrapolated above beta_fast, a linear
    ramp between; `truncate` rounds the ramp's ends to whole dimensions (gpt-oss: false)."""
    import math

    import torch

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(yarn["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(yarn["beta_fast"]), correction_dim(yarn["beta_slow"])
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (yarn["factor"] * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def apply_yarn(model, head_dim: int, theta: float, yarn: Optional[dict]) -> None:
    """Replace a GPTModel's RoPE inverse frequencies by yarn's (the attention factor enters the
    softmax scale instead: see yarn_attention_factor)."""
    if not yarn or getattr(model, "rotary_pos_emb", None) is None:
        return
    rotary = model.rotary_pos_emb
    rotary.inv_freq = yarn_inv_freq(head_dim, theta, yarn).to(rotary.inv_freq.device)
