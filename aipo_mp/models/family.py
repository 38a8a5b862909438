"""The family record and the declarative HF <-> Megatron parameter tables every family shares.
Torch-free: validation, the planner and the converters' planning code read families without
importing torch. Model construction and the tensor transforms live in aipo_mp/models/build.py.

Family modules (llama.py, mistral.py, gemma2.py, qwen2.py, qwen3.py) supply only data and small
functions: how to read their HF config, which spec options they need, and their parameter-name table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from aipo_mp.config import ModelArch
from aipo_mp.models.rope import rope_scaling_of, rope_theta_of

# ---------------------------------------------------------------------------------------------
# Parameter mapping
# ---------------------------------------------------------------------------------------------

COPY, QKV, GLU = "copy", "qkv", "glu"
NONE, COLUMN, ROW, GLU_COLUMN = "none", "column", "row", "glu_column"


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it is made of. `{i}` is the global layer index.

    transform: copy | qkv (q, k, v fused per query group; weights and biases) | glu (gate and up stacked)
    split: how tensor parallelism slices the Megatron tensor: none | column (dim 0) | row (dim 1)
           | glu_column (each rank holds [gate shard; up shard])
    te_alias: the Transformer Engine spec's name of a tensor the local spec names otherwise (TE fuses
           the input norms into the linears); `hf_names` skips it, the local rule lists the HF tensor.
    """

    megatron: str
    hf: tuple[str, ...]
    transform: str = COPY
    split: str = NONE
    te_alias: bool = False

    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.megatron).replace(r"\{i\}", r"(\d+)") + "$")


def decoder_rules(pre_mlp_norm: str = "post_attention_layernorm", extra: tuple[Rule, ...] = ()) -> list[Rule]:
    """The Llama-style table shared by all three families. `pre_mlp_norm` is the HF name of the
    norm before the MLP (Llama calls it post_attention_layernorm); Gemma-2 adds its norms in `extra`."""
    L, H = "decoder.layers.{i}.", "model.layers.{i}."
    return [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split=COLUMN),
        Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
        Rule(L + "pre_mlp_layernorm.weight", (f"{H}{pre_mlp_norm}.weight",)),
        # Transformer Engine spec: the same norms, fused into the following linears (replicated
        # over TP, tagged sequence_parallel by TE).
        Rule(L + "self_attention.linear_qkv.layer_norm_weight", (H + "input_layernorm.weight",), te_alias=True),
        Rule(L + "mlp.linear_fc1.layer_norm_weight", (f"{H}{pre_mlp_norm}.weight",), te_alias=True),
        Rule(
            L + "self_attention.linear_qkv.weight",
            tuple(f"{H}self_attn.{p}_proj.weight" for p in "qkv"),
            QKV,
            COLUMN,
        ),
        Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), split=ROW),
        Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GLU, GLU_COLUMN),
        Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), split=ROW),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *extra,
    ]


# Qwen2: biases of q, k, v, fused like the weights (per query group), column-split with them.
QKV_BIAS_RULE = Rule("decoder.layers.{i}.self_attention.linear_qkv.bias",
                     tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"), QKV, COLUMN)
# Qwen3: per-head RMSNorm weights over head_dim, shared by all heads (replicated over TP; megatron
# sums their grads over TP when config.qk_layernorm). Same names in the local and TE specs.
QK_NORM_RULES = (
    Rule("decoder.layers.{i}.self_attention.q_layernorm.weight", ("model.layers.{i}.self_attn.q_norm.weight",)),
    Rule("decoder.layers.{i}.self_attention.k_layernorm.weight", ("model.layers.{i}.self_attn.k_norm.weight",)),
)


def output_rule(tied: bool) -> Rule:
    # Tied models have no lm_head; the last pipeline stage's copy is the embedding.
    return Rule("output_layer.weight", ("model.embed_tokens.weight" if tied else "lm_head.weight",), split=COLUMN)


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecOptions:
    zero_centered_norm: bool = False  # Gemma: x̂·(1+w)
    post_norms: bool = False  # Gemma-2: norms after attention and after the MLP
    activation: str = "silu"  # silu | gelu_tanh (aipo_mp/models/build.py maps the name to the function)
    attn_logit_softcapping: Optional[float] = None
    window_size: Optional[int] = None
    sliding_layers: Optional[tuple] = None  # 1-based layer numbers with the window; None: all
    softmax_scale: Optional[float] = None
    embedding_scale: Optional[float] = None  # Gemma: sqrt(hidden)
    final_logit_softcapping: Optional[float] = None
    qk_norm: bool = False  # Qwen3: megatron's q_layernorm / k_layernorm (RMSNorm over head_dim)

    @property
    def te_fused_attention(self) -> bool:
        """Transformer Engine's fused attention and norms serve this layer; soft-capping, a
        sliding window and post-norms are not in TE's fused kernels (Gemma-2 keeps the local ones)."""
        return not (self.post_norms or self.attn_logit_softcapping or self.window_size)

    @property
    def norms_per_layer(self) -> int:
        """Hidden-size norms in one layer: input and pre-MLP, plus the two post-norms (Gemma-2)."""
        return 4 if self.post_norms else 2


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_type: str
    arch_from_hf: Callable[[dict], ModelArch]
    hf_config: Callable[[ModelArch], dict]
    spec_options: Callable[[ModelArch], SpecOptions]
    rules: Callable[[ModelArch], list[Rule]]
    notes: str = ""
    # Shape flags every model of the family has (a model.arch from YAML must say so, as config.json implies it).
    arch_flags: tuple[tuple[str, bool], ...] = (("qkv_bias", False), ("qk_norm", False))

    def rule_for(self, arch: ModelArch, megatron_name: str) -> tuple[Rule, Optional[int]]:
        for rule in self.rules(arch):
            m = rule.pattern().match(megatron_name)
            if m:
                return rule, (int(m.group(1)) if m.groups() else None)
        raise KeyError(f"no {self.name} mapping for Megatron parameter {megatron_name}")

    def hf_names(self, arch: ModelArch) -> list[str]:
        """Every HF tensor name a checkpoint of this architecture holds."""
        names = []
        for rule in self.rules(arch):
            if rule.te_alias or (rule.megatron == "output_layer.weight" and arch.tie_embeddings):
                continue
            layers = range(arch.num_layers) if "{i}" in rule.megatron else [None]
            names += [n.format(i=i) for i in layers for n in rule.hf]
        return names


def common_arch_fields(hf: dict, family: str) -> dict:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dict(
        family=family,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=hf["vocab_size"],
        rope_theta=rope_theta_of(hf),
        rope_scaling=rope_scaling_of(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
    )


# Checkpoint keys of the local spec's norms: the same as the Transformer Engine spec's (norms fused
# into the linears there), so a checkpoint moves between backends. mcore-to-hf reads it too.
CHECKPOINT_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
