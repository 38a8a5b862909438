"""DeepSeek-V3 (DeepseekV3ForCausalLM): DeepSeek-V3/R1 671B, and Kimi-K2 (the same architecture).

- Multi-head latent attention (megatron's MLASelfAttention): queries through a low-rank projection
  q_a_proj -> q_a_layernorm -> q_b_proj (or q_proj when q_lora_rank is null), keys and values
  through kv_a_proj_with_mqa (kv_lora_rank latent + one shared RoPE key of qk_rope_head_dim) ->
  kv_a_layernorm -> kv_b_proj; per head a no-RoPE part (qk_nope_head_dim), a RoPE part and a
  value of v_head_dim. RoPE pairs are interleaved (rope_interleave) and scaled by yarn, whose
  mscale also scales the softmax (both as transformers does).
- Routing: sigmoid scores; an expert bias (`e_score_correction_bias`, megatron's router
  `expert_bias` buffer) added for selection only; top `topk_group` of `n_group` groups by the sum
  of each group's two best biased scores, then the top-k experts in them; weights are the
  unbiased scores renormalised and multiplied by `routed_scaling_factor`.
- One shared expert per MoE layer (n_shared_experts x moe_intermediate_size wide), always added.
- The first `first_k_dense_replace` layers keep a dense MLP.
- The released checkpoints carry a multi-token-prediction layer as `model.layers.{num_hidden_layers}`
  (and up): preference training does not use it, so import drops it (a note names it) and export
  does not write it unless asked (`mcore-to-hf --restore-dropped SOURCE_HF_DIR` copies it back).
"""

from __future__ import annotations

from aipo_mp.config import ModelArch
from aipo_mp.errors import ConfigError
from aipo_mp.models.family import (
    COLUMN,
    DENSE_LAYERS,
    GLU,
    GLU_COLUMN,
    MOE_LAYERS,
    ROW,
    Family,
    Rule,
    SpecOptions,
    moe_rules,
    output_rule,
)
from aipo_mp.models.rope import rope_theta_of

YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def yarn_of(hf: dict) -> dict:
    """The yarn RoPE scaling of a DeepSeek-V3 config.json (rope_parameters or rope_scaling), in the
    form megatron's MLA reproduces exactly; anything else is refused with one line."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != "yarn":
        raise ConfigError(f"deepseek_v3: RoPE type {kind!r} is not supported (megatron's latent attention applies "
                          "yarn scaling); released DeepSeek-V3 configs use yarn")
    if params.get("attention_factor") is not None or params.get("truncate") is False:
        raise ConfigError("deepseek_v3: yarn attention_factor / truncate=false are not supported; remove them "
                          "(released configs do not set them)")
    if params.get("factor") is None or params.get("original_max_position_embeddings") is None:
        raise ConfigError("deepseek_v3: yarn RoPE scaling needs factor and original_max_position_embeddings")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        # transformers then scales cos/sin by the plain yarn factor and the softmax by mscale_all_dim
        # alone; megatron's mscale=1, mscale_all_dim=0 does the same only when mscale_all_dim is unset.
        if mscale_all_dim:
            raise ConfigError("deepseek_v3: yarn mscale_all_dim without mscale is not supported; set both "
                              "(released configs: mscale 1.0, mscale_all_dim 1.0)")
        mscale, mscale_all_dim = 1.0, 0.0
    return dict(factor=float(params["factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))


def refuse_unsupported(hf: dict) -> None:
    checks = (
        (hf.get("rope_interleave", True) is False, "rope_interleave=false (megatron's latent attention always "
                                                   "de-interleaves the RoPE pairs)"),
        (hf.get("attention_bias"), "attention_bias=true"),
        (hf.get("norm_topk_prob", True) is False, "norm_topk_prob=false (megatron renormalises sigmoid top-k)"),
        (hf.get("topk_method", "noaux_tc") != "noaux_tc", f"topk_method={hf.get('topk_method')!r}"),
        (hf.get("scoring_func", "sigmoid") != "sigmoid", f"scoring_func={hf.get('scoring_func')!r}"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r}"),
    )
    for bad, what in checks:
        if bad:
            raise ConfigError(f"deepseek_v3: {what} is not supported; released DeepSeek-V3/Kimi-K2 configs do not "
                              "use it")


def arch_from_hf(hf: dict) -> ModelArch:
    refuse_unsupported(hf)
    layers = hf["num_hidden_layers"]
    experts = hf["n_routed_experts"] if "n_routed_experts" in hf else hf["num_local_experts"]
    moe_width = hf["moe_intermediate_size"]
    return ModelArch(
        family="deepseek_v3",
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_attention_heads"],  # latent attention: every head has its own k/v
        head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
        vocab_size=hf["vocab_size"],
        rope_theta=rope_theta_of(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        num_experts=experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=moe_width,
        norm_topk_prob=True,
        dense_layers=list(range(min(hf.get("first_k_dense_replace") or 0, layers))),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        shared_expert_intermediate_size=moe_width * (hf.get("n_shared_experts") or 0),
        yarn=yarn_of(hf),
    )


def hf_config(arch: ModelArch) -> dict:
    yarn = arch.yarn or {}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "moe_intermediate_size": arch.moe_intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_attention_heads,
        "n_shared_experts": arch.shared_expert_intermediate_size // max(arch.moe_intermediate_size, 1),
        "n_routed_experts": arch.num_experts,
        "routed_scaling_factor": arch.routed_scaling_factor,
        "kv_lora_rank": arch.kv_lora_rank,
        "q_lora_rank": arch.q_lora_rank or None,
        "qk_rope_head_dim": arch.qk_rope_head_dim,
        "qk_nope_head_dim": arch.qk_nope_head_dim,
        "v_head_dim": arch.v_head_dim,
        "n_group": arch.n_group,
        "topk_group": arch.topk_group,
        "num_experts_per_tok": arch.num_experts_per_tok,
        "first_k_dense_replace": len(arch.dense_layers),
        "norm_topk_prob": True,
        # transformers does not write these; vLLM routes without the group limit and the bias
        # otherwise (released configs carry them).
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "tie_word_embeddings": arch.tie_embeddings,
        "rope_theta": arch.rope_theta,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": arch.rope_theta, **{k: yarn[k] for k in YARN_FIELDS
                                                                                  if k in yarn}},
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": 0,  # the multi-token-prediction layer is not exported
    }


def arch_errors(arch: ModelArch) -> list[str]:
    """What megatron cannot reproduce of a DeepSeek-V3 architecture (model.arch or config.json)."""
    errors = []
    if arch.kv_lora_rank < 1 or arch.qk_rope_head_dim < 2 or arch.v_head_dim < 1 or arch.qk_nope_head_dim < 1:
        errors.append("model.arch: deepseek_v3 needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim (even) and "
                      "v_head_dim (> 0)")
    if arch.dense_layers != list(range(len(arch.dense_layers))):
        errors.append(f"model.arch.dense_layers={arch.dense_layers}: deepseek_v3's dense layers are the first k "
                      "(first_k_dense_replace); list 0 .. k-1")
    groups, topk_group = arch.n_group or 1, arch.topk_group or 1
    if arch.num_experts % groups or not 1 <= topk_group <= groups:
        errors.append(f"model.arch.n_group={groups}, topk_group={topk_group}: n_group must divide the "
                      f"{arch.num_experts} experts and topk_group be in [1, n_group]")
    elif groups > 1 and arch.num_experts_per_tok != 2 * topk_group:
        # Groups are ranked by their two best scores (transformers); megatron uses the best
        # top_k / topk_group: the same only when that is 2 (DeepSeek-V3: 8 / 4).
        errors.append(f"model.arch.num_experts_per_tok={arch.num_experts_per_tok}: with expert groups it must be "
                      f"2 x topk_group ({2 * topk_group}), as in DeepSeek-V3 (8 of 4 groups)")
    if arch.shared_expert_intermediate_size % max(arch.moe_intermediate_size, 1):
        errors.append("model.arch.shared_expert_intermediate_size: must be a multiple of moe_intermediate_size "
                      "(n_shared_experts x moe_intermediate_size)")
    if not arch.yarn:
        errors.append("model.arch.yarn: deepseek_v3 needs its yarn RoPE scaling (factor, "
                      "original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim)")
    return errors


L, H = "decoder.layers.{i}.", "model.layers.{i}."
A, HA = L + "self_attention.", H + "self_attn."


def attention_rules(arch: ModelArch) -> list[Rule]:
    """Latent attention. The down projections are column-parallel in megatron's local spec (each
    TP rank computes part of the latent, then they are gathered); the up projections are split
    by heads; the two latent norms are replicated."""
    if arch.q_lora_rank:
        query = [Rule(A + "linear_q_down_proj.weight", (HA + "q_a_proj.weight",), split=COLUMN),
                 Rule(A + "q_layernorm.weight", (HA + "q_a_layernorm.weight",)),
                 Rule(A + "linear_q_up_proj.weight", (HA + "q_b_proj.weight",), split=COLUMN)]
    else:
        query = [Rule(A + "linear_q_proj.weight", (HA + "q_proj.weight",), split=COLUMN)]
    return query + [
        Rule(A + "linear_kv_down_proj.weight", (HA + "kv_a_proj_with_mqa.weight",), split=COLUMN),
        Rule(A + "kv_layernorm.weight", (HA + "kv_a_layernorm.weight",)),
        Rule(A + "linear_kv_up_proj.weight", (HA + "kv_b_proj.weight",), split=COLUMN),
        Rule(A + "linear_proj.weight", (HA + "o_proj.weight",), split=ROW),
    ]


def mlp_rules() -> list[Rule]:
    dense, moe = dict(layers=DENSE_LAYERS), dict(layers=MOE_LAYERS)
    shared = H + "mlp.shared_experts."
    return [
        Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GLU, GLU_COLUMN,
             **dense),
        Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), split=ROW, **dense),
        *moe_rules("mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
        # The expert bias: a buffer in megatron (selection only, no gradient), fp32 in HF.
        Rule(L + "mlp.router.expert_bias", (H + "mlp.gate.e_score_correction_bias",), buffer=True, fp32=True, **moe),
        Rule(L + "mlp.shared_experts.linear_fc1.weight", (shared + "gate_proj.weight", shared + "up_proj.weight"),
             GLU, GLU_COLUMN, **moe),
        Rule(L + "mlp.shared_experts.linear_fc2.weight", (shared + "down_proj.weight",), split=ROW, **moe),
    ]


def rules(arch: ModelArch) -> list[Rule]:
    return [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split=COLUMN),
        Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
        *attention_rules(arch),
        Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
        *mlp_rules(),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        output_rule(arch.tie_embeddings),
    ]


def hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each per-layer HF tensor name suffix (and the others)."""
    h, heads, e = arch.hidden_size, arch.num_attention_heads, arch.num_experts
    qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
    i, s, f = arch.moe_intermediate_size, arch.shared_expert_intermediate_size, arch.intermediate_size
    return {
        "q_a_proj.weight": (arch.q_lora_rank, h), "q_a_layernorm.weight": (arch.q_lora_rank,),
        "q_b_proj.weight": (heads * qk, arch.q_lora_rank), "q_proj.weight": (heads * qk, h),
        "kv_a_proj_with_mqa.weight": (arch.kv_lora_rank + arch.qk_rope_head_dim, h),
        "kv_a_layernorm.weight": (arch.kv_lora_rank,),
        "kv_b_proj.weight": (heads * (arch.qk_nope_head_dim + arch.v_head_dim), arch.kv_lora_rank),
        "o_proj.weight": (h, heads * arch.v_head_dim),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "mlp.gate.weight": (e, h), "mlp.gate.e_score_correction_bias": (e,),
        "shared_experts.gate_proj.weight": (s, h), "shared_experts.up_proj.weight": (s, h),
        "shared_experts.down_proj.weight": (h, s),
        "experts.gate_proj.weight": (i, h), "experts.up_proj.weight": (i, h), "experts.down_proj.weight": (h, i),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
        "embed_tokens.weight": (arch.vocab_size, h), "lm_head.weight": (arch.vocab_size, h), "model.norm.weight": (h,),
    }


def expected_shapes(arch: ModelArch, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of HF tensor names: experts' names are matched without their index."""
    table = hf_shapes(arch)
    out = {}
    for name in names:
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            k = parts.index("experts")
            parts = parts[:k + 1] + parts[k + 2:]
        key = ".".join(parts)
        out[name] = next((shape for suffix, shape in table.items() if key.endswith(suffix)), None)
    return {n: s for n, s in out.items() if s is not None}


def export_config(hf: dict) -> dict:
    """The imported config.json as export writes it: vLLM's routing keys (transformers does not
    write them, and vLLM routes without the group limit and the bias otherwise), no
    multi-token-prediction layer (exported only by `mcore-to-hf --restore-dropped`, which puts the
    source's count back), and no quantization (weights are bf16/fp32)."""
    out = {k: v for k, v in hf.items() if k != "quantization_config"}
    return {**out, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0}


def dropped_on_import(arch: ModelArch, name: str) -> bool:
    """The multi-token-prediction layer(s): `model.layers.{N}.*` with N >= num_hidden_layers."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= arch.num_layers


FAMILY = Family(
    name="deepseek_v3",
    hf_architectures=("DeepseekV3ForCausalLM",),
    hf_model_type="deepseek_v3",
    arch_from_hf=arch_from_hf,
    hf_config=hf_config,
    spec_options=lambda arch: SpecOptions(mla=True),
    rules=rules,
    notes="the multi-token-prediction layer of the released checkpoints is dropped on import; "
          "mcore-to-hf --restore-dropped HF_DIR puts it back",
    moe=True,
    arch_errors=arch_errors,
    expected_shapes=expected_shapes,
    dropped_on_import=dropped_on_import,
    export_config=export_config,
)
