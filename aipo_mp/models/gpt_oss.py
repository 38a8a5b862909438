"""gpt-oss (GptOssForCausalLM): gpt-oss-120b and gpt-oss-20b. Differences from Mixtral, all honoured:

- Attention sinks: one learned logit per head (`self_attn.sinks`) joins every softmax's denominator
  and attends nothing; megatron's name for it is the core attention's `softmax_offset`, which the
  project's torch core attention holds on the local spec (aipo_mp/models/layers.py).
- Sliding-window attention on the layers `layer_types` marks "sliding_attention" (transformers'
  default: even 0-based layers), window `sliding_window` (128); full attention on the others.
- Biases on q, k, v, o, on the router and on every expert's projections (megatron's add_bias_linear).
- Experts stored fused over the layer's experts: `mlp.experts.gate_up_proj` [E, hidden, 2 x width]
  with gate and up INTERLEAVED along the last dim (columns 0, 2, 4, ... gate; 1, 3, 5, ... up),
  its bias `gate_up_proj_bias` [E, 2 x width] interleaved the same way, `down_proj` [E, width,
  hidden] and `down_proj_bias` [E, hidden]. Megatron's linear_fc1 is [gate; up] rows of
  [2 x width, hidden] (its bias likewise), linear_fc2 [hidden, width]. The HF reader presents
  expert e's slice of each fused tensor as `mlp.experts.{e}.<name>` (Family.expert_slices).
- Clamped SwiGLU: gate <= 7, -7 <= up <= 7, out = gate·sigmoid(1.702·gate)·(up + 1): megatron's
  quick_gelu with activation_func_clamp_value 7 and glu_linear_offset 1 (local MLP, as computed).
- Routing: logits = router(x) + bias, the top-k logits, softmax over them (megatron: softmax scores,
  pre_softmax off). An expert's output, bias included, is scaled by its routing weight.
- yarn RoPE (factor 32, beta_fast 32, beta_slow 1, truncate false in the releases): transformers'
  inverse frequencies (aipo_mp/models/rope.py), and its cos/sin factor 0.1·ln(factor) + 1 applied
  to q and k, i.e. its square on the softmax scale. RoPE halves are not interleaved.

Not supported: other swiglu_alpha/swiglu_limit values (refused), attention_bias=false (refused),
RoPE types other than yarn and default (refused). The released MXFP4 experts (`*_blocks`/`*_scales`)
are dequantized by aipo_mp/convert/quantized.py on read; exports (mcore-to-hf, the trainer's
handoff) write the fused layout above in bf16, without the quantization_config.
"""

from __future__ import annotations

from aipo_mp.config import ModelArch
from aipo_mp.errors import ConfigError
from aipo_mp.models.family import (
    COLUMN,
    GLU_COLUMN,
    GLU_INTERLEAVED,
    MOE_LAYERS,
    QKV,
    ROW,
    TRANSPOSE,
    Family,
    Rule,
    SpecOptions,
    output_rule,
)
from aipo_mp.models.rope import rope_theta_of, yarn_attention_factor

SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # megatron's quick_gelu hard-codes 1.702
YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate")


def default_layer_types(num_layers: int) -> list[str]:
    """transformers' default: sliding window on even 0-based layers (1st, 3rd, ...)."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]


def yarn_of(hf: dict) -> dict | None:
    """The yarn RoPE scaling of a gpt-oss config.json (None: plain RoPE); anything else refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"gpt_oss: RoPE type {kind!r} is not supported; supported: yarn (as released), default")
    if params.get("factor") is None or params.get("original_max_position_embeddings") is None:
        raise ConfigError("gpt_oss: yarn RoPE scaling needs factor and original_max_position_embeddings")
    if params.get("attention_factor") is not None or params.get("mscale") or params.get("mscale_all_dim"):
        raise ConfigError("gpt_oss: yarn attention_factor / mscale / mscale_all_dim are not supported; remove them "
                          "(released gpt-oss configs do not set them)")
    return dict(factor=float(params["factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                truncate=bool(params.get("truncate", True)))


def refuse_unsupported(hf: dict) -> None:
    checks = (
        (float(hf.get("swiglu_alpha", SWIGLU_ALPHA)) != SWIGLU_ALPHA, f"swiglu_alpha={hf.get('swiglu_alpha')}"),
        (float(hf.get("swiglu_limit", SWIGLU_LIMIT)) != SWIGLU_LIMIT, f"swiglu_limit={hf.get('swiglu_limit')}"),
        (hf.get("attention_bias", True) is False, "attention_bias=false"),
        (bool(hf.get("tie_word_embeddings", False)), "tie_word_embeddings=true"),
    )
    for bad, what in checks:
        if bad:
            raise ConfigError(f"gpt_oss: {what} is not supported; released gpt-oss configs use swiglu_alpha "
                              f"{SWIGLU_ALPHA}, swiglu_limit {SWIGLU_LIMIT}, biases and untied embeddings")


def arch_from_hf(hf: dict) -> ModelArch:
    refuse_unsupported(hf)
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    width = hf["intermediate_size"]
    return ModelArch(
        family="gpt_oss",
        hidden_size=hf["hidden_size"],
        intermediate_size=width,
        num_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        rope_theta=rope_theta_of(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=False,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        sliding_window=hf.get("sliding_window"),
        layer_types=list(hf.get("layer_types") or default_layer_types(layers)),
        qkv_bias=True,
        num_experts=hf["num_local_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=width,
        norm_topk_prob=True,  # softmax over the top-k logits: the weights sum to 1
        yarn=yarn_of(hf),
    )


def hf_config(arch: ModelArch) -> dict:
    yarn = arch.yarn
    rope = {"rope_type": "yarn", "rope_theta": arch.rope_theta, **{k: yarn[k] for k in YARN_FIELDS if k in yarn}} \
        if yarn else {"rope_type": "default", "rope_theta": arch.rope_theta}
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.moe_intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "num_local_experts": arch.num_experts,
        "num_experts_per_tok": arch.num_experts_per_tok,
        "sliding_window": arch.sliding_window,
        "layer_types": arch.layer_types or default_layer_types(arch.num_layers),
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "tie_word_embeddings": False,
        "rope_theta": arch.rope_theta,
        "rope_parameters": rope,
        "attention_bias": True,
        "swiglu_alpha": SWIGLU_ALPHA,
        "swiglu_limit": SWIGLU_LIMIT,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
        "hidden_act": "silu",
    }


def arch_errors(arch: ModelArch) -> list[str]:
    """What megatron cannot reproduce of a gpt-oss architecture (model.arch or config.json)."""
    errors = []
    if arch.dense_layers:
        errors.append(f"model.arch.dense_layers={arch.dense_layers}: every gpt-oss layer is a mixture of experts; "
                      "set []")
    if arch.moe_intermediate_size != arch.intermediate_size:
        errors.append("model.arch.moe_intermediate_size: gpt-oss's experts are intermediate_size wide; set both equal")
    types = arch.layer_types or default_layer_types(arch.num_layers)
    if len(types) != arch.num_layers or set(types) - {"sliding_attention", "full_attention"}:
        errors.append(f"model.arch.layer_types: give one of sliding_attention | full_attention per layer "
                      f"({arch.num_layers})")
    elif "sliding_attention" in types and not arch.sliding_window:
        errors.append("model.arch.sliding_window: sliding_attention layers need a window (> 0)")
    if arch.yarn and any(arch.yarn.get(k) is None for k in YARN_FIELDS[:4]):
        errors.append(f"model.arch.yarn: give {', '.join(YARN_FIELDS)} (released: factor 32, "
                      "original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, truncate false)")
    return errors


def spec_options(arch: ModelArch) -> SpecOptions:
    types = arch.layer_types or default_layer_types(arch.num_layers)
    scale = arch.head_dim ** -0.5
    if arch.yarn:  # transformers scales cos and sin (q and k) by the yarn factor: the scores by its square
        scale *= yarn_attention_factor(arch.yarn) ** 2
    return SpecOptions(
        activation="quick_gelu",
        window_size=arch.sliding_window if "sliding_attention" in types else None,
        sliding_layers=tuple(i + 1 for i, t in enumerate(types) if t == "sliding_attention"),
        softmax_scale=scale,
        attention_sinks=True,
        linear_bias=True,
        glu_linear_offset=1.0,
        activation_clamp=SWIGLU_LIMIT,
    )


L, H = "decoder.layers.{i}.", "model.layers.{i}."
A, HA = L + "self_attention.", H + "self_attn."
X, HX = L + "mlp.experts.local_experts.{e}.", H + "mlp.experts.{e}."
# The fused tensors of a layer's experts and the per-expert name of expert e's slice of each.
EXPERT_SLICES = tuple((f"{H}mlp.experts.{n}", f"{HX}{n}")
                      for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"))


def rules(arch: ModelArch) -> list[Rule]:
    moe, expert = dict(layers=MOE_LAYERS), dict(layers=MOE_LAYERS, expert=True)
    return [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split=COLUMN),
        Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
        Rule(A + "linear_qkv.weight", tuple(f"{HA}{p}_proj.weight" for p in "qkv"), QKV, COLUMN),
        Rule(A + "linear_qkv.bias", tuple(f"{HA}{p}_proj.bias" for p in "qkv"), QKV, COLUMN),
        Rule(A + "core_attention.softmax_offset", (HA + "sinks",), split=COLUMN),
        Rule(A + "linear_proj.weight", (HA + "o_proj.weight",), split=ROW),
        Rule(A + "linear_proj.bias", (HA + "o_proj.bias",)),  # added once, after the TP reduction
        Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
        Rule(L + "mlp.router.weight", (H + "mlp.router.weight",), **moe),
        Rule(L + "mlp.router.bias", (H + "mlp.router.bias",), **moe),
        Rule(X + "linear_fc1.weight", (HX + "gate_up_proj",), GLU_INTERLEAVED, GLU_COLUMN, **expert),
        Rule(X + "linear_fc1.bias", (HX + "gate_up_proj_bias",), GLU_INTERLEAVED, GLU_COLUMN, **expert),
        Rule(X + "linear_fc2.weight", (HX + "down_proj",), TRANSPOSE, ROW, **expert),
        Rule(X + "linear_fc2.bias", (HX + "down_proj_bias",), **expert),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        output_rule(False),
    ]


def expected_shapes(arch: ModelArch, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each HF name (experts per expert, as the reader presents them)."""
    h, hd, e, w = arch.hidden_size, arch.head_dim, arch.num_experts, arch.moe_intermediate_size
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    table = {
        "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h), "o_proj.weight": (h, q),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.bias": (h,),
        "sinks": (arch.num_attention_heads,), "router.weight": (e, h), "router.bias": (e,),
        "gate_up_proj": (h, 2 * w), "gate_up_proj_bias": (2 * w,), "down_proj": (w, h), "down_proj_bias": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,), "model.norm.weight": (h,),
        "embed_tokens.weight": (arch.vocab_size, h), "lm_head.weight": (arch.vocab_size, h),
    }
    out = {}
    for name in names:
        shape = next((s for suffix, s in table.items() if name.endswith("." + suffix) or name == suffix), None)
        if shape is not None:
            out[name] = shape
    return out


def extra_params(arch: ModelArch, active: bool) -> int:
    """What the shared count misses: the o_proj bias and the sinks of every layer, the router bias
    and the experts' biases of every MoE layer (only the top-k experts' when active)."""
    experts = arch.num_experts_per_tok if active else arch.num_experts
    per_expert = 2 * arch.moe_intermediate_size + arch.hidden_size
    per_layer = arch.hidden_size + arch.num_attention_heads + arch.num_experts + experts * per_expert
    return arch.num_layers * per_layer


def export_config(hf: dict) -> dict:
    """The imported config.json as export writes it: the experts are written bf16 (fused, as
    transformers stores them), so a release's MXFP4 quantization_config is dropped."""
    return {k: v for k, v in hf.items() if k != "quantization_config"}


FAMILY = Family(
    name="gpt_oss",
    hf_architectures=("GptOssForCausalLM",),
    hf_model_type="gpt_oss",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=spec_options,
    rules=rules,
    notes="experts are read from the fused, gate/up-interleaved layout of the releases",
    arch_flags=(("qkv_bias", True), ("qk_norm", False)),
    moe=True,
    arch_errors=arch_errors,
    expected_shapes=expected_shapes,
    extra_params=extra_params,
    expert_slices=EXPERT_SLICES,
    export_config=export_config,
)
