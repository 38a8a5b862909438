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
# gpt-oss experts: gate and up interleaved in the columns of one [hidden, 2 x width] matrix (or in
# one [2 x width] bias), and the down projection stored [width, hidden] (aipo_mp/models/gpt_oss.py).
GLU_INTERLEAVED, TRANSPOSE = "glu_interleaved", "transpose"
# Transforms the converters apply to a whole (per-expert) tensor rather than as runs of HF rows:
# they reorder columns. One expert's tensor is small (gpt-oss-120b: 2880 x 5760 bf16, 33 MB).
WHOLE_TENSOR = (GLU_INTERLEAVED, TRANSPOSE)
NONE, COLUMN, ROW, GLU_COLUMN = "none", "column", "row", "glu_column"
ALL_LAYERS, MOE_LAYERS, DENSE_LAYERS = "all", "moe", "dense"


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it is made of. `{i}` is the global layer index,
    `{e}` the global expert index (expert rules).

    transform: copy | qkv (q, k, v fused per query group; weights and biases) | glu (gate and up stacked)
           | glu_interleaved (one HF tensor, gate and up alternating along its last dim; a matrix is
           transposed) | transpose (a matrix stored [in, out])
    split: how tensor parallelism slices the Megatron tensor: none | column (dim 0) | row (dim 1)
           | glu_column (each rank holds [gate shard; up shard])
    te_alias: the Transformer Engine spec's name of a tensor the local spec names otherwise (TE fuses
           the input norms into the linears); `hf_names` skips it, the local rule lists the HF tensor.
    layers: which layers hold the tensor: all | moe | dense (MoE models may keep dense-MLP layers).
    expert: one tensor per expert; expert parallelism picks a rank's experts and the split applies
           over the expert-tensor-parallel group instead of the tensor-parallel one.
    buffer: a module buffer, not a parameter (DeepSeek-V3's router expert bias): loaded and
           saved like a parameter, never trained by the optimizer.
    fp32: held in fp32 whatever the model's dtype (HF keeps the expert bias so); export writes fp32.
    """

    megatron: str
    hf: tuple[str, ...]
    transform: str = COPY
    split: str = NONE
    te_alias: bool = False
    layers: str = ALL_LAYERS
    expert: bool = False
    buffer: bool = False
    fp32: bool = False

    def pattern(self) -> re.Pattern:
        escaped = re.escape(self.megatron).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        return re.compile("^" + escaped + "$")

    def hf_at(self, index: dict) -> list[str]:
        """The HF names at one layer (and expert): index is {"i": layer, "e": expert} or part of it."""
        return [n.format(**index) for n in self.hf]

    def held_by(self, arch: ModelArch, layer: int) -> bool:
        if self.layers == ALL_LAYERS:
            return True
        return (layer in arch.dense_layers) == (self.layers == DENSE_LAYERS)


def decoder_rules(pre_mlp_norm: str = "post_attention_layernorm", extra: tuple[Rule, ...] = (),
                  mlp_layers: str = ALL_LAYERS) -> list[Rule]:
    """The Llama-style table shared by all families. `pre_mlp_norm` is the HF name of the norm
    before the MLP (Llama calls it post_attention_layernorm); Gemma-2 adds its norms in `extra`.
    `mlp_layers`: the layers with a dense MLP (MoE families: only their dense layers)."""
    L, H = "decoder.layers.{i}.", "model.layers.{i}."
    return [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split=COLUMN),
        Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
        Rule(L + "pre_mlp_layernorm.weight", (f"{H}{pre_mlp_norm}.weight",)),
        # Transformer Engine spec: the same norms, fused into the following linears (replicated
        # over TP, tagged sequence_parallel by TE). MoE layers keep a separate pre-MLP norm there.
        Rule(L + "self_attention.linear_qkv.layer_norm_weight", (H + "input_layernorm.weight",), te_alias=True),
        Rule(L + "mlp.linear_fc1.layer_norm_weight", (f"{H}{pre_mlp_norm}.weight",), te_alias=True,
             layers=mlp_layers),
        Rule(
            L + "self_attention.linear_qkv.weight",
            tuple(f"{H}self_attn.{p}_proj.weight" for p in "qkv"),
            QKV,
            COLUMN,
        ),
        Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), split=ROW),
        Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GLU, GLU_COLUMN,
             layers=mlp_layers),
        Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), split=ROW, layers=mlp_layers),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *extra,
    ]


def moe_rules(router: str, experts: str, gate_up_down: tuple[str, str, str]) -> list[Rule]:
    """MoE layers: the router (replicated) and every expert's gated MLP. `router` and `experts`
    are the HF module paths inside a layer (Qwen3-MoE: mlp.gate, mlp.experts; Mixtral:
    block_sparse_moe.gate, block_sparse_moe.experts); `gate_up_down` the projections' names.
    Megatron names carry the global expert index: the local spec's SequentialMLP and TE's grouped
    GEMM (`linear_fc1.weight{e}`) number a rank's experts from 0 (aipo_mp.models.build maps them)."""
    L, H = "decoder.layers.{i}.mlp.", "model.layers.{i}."
    gate, up, down = (f"{H}{experts}.{{e}}.{name}.weight" for name in gate_up_down)
    expert = dict(layers=MOE_LAYERS, expert=True)
    return [
        Rule(L + "router.weight", (f"{H}{router}.weight",), layers=MOE_LAYERS),
        Rule(L + "experts.local_experts.{e}.linear_fc1.weight", (gate, up), GLU, GLU_COLUMN, **expert),
        Rule(L + "experts.local_experts.{e}.linear_fc2.weight", (down,), split=ROW, **expert),
        Rule(L + "experts.linear_fc1.weight{e}", (gate, up), GLU, GLU_COLUMN, te_alias=True, **expert),
        Rule(L + "experts.linear_fc2.weight{e}", (down,), split=ROW, te_alias=True, **expert),
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
    mla: bool = False  # DeepSeek-V3: megatron's multi-latent attention (MLATransformerConfig, local spec)
    attention_sinks: bool = False  # gpt-oss: a learned per-head logit in every softmax's denominator
    linear_bias: bool = False  # gpt-oss: biases on every linear (q/k/v/o, router, experts)
    glu_linear_offset: float = 0.0  # gpt-oss: act(gate) * (up + 1)
    activation_clamp: Optional[float] = None  # gpt-oss: gate <= c, -c <= up <= c before the GLU

    @property
    def te_fused_attention(self) -> bool:
        """Transformer Engine's fused attention and norms serve this layer; soft-capping, a
        sliding window and post-norms are not in TE's fused kernels (Gemma-2 keeps the local ones)."""
        return not (self.post_norms or self.attn_logit_softcapping or self.window_size or self.mla
                    or self.attention_sinks)

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
    moe: bool = False  # a mixture-of-experts family: model.arch must give num_experts and the router's top-k
    # Family-specific checks and tables (None: the shared llama-style ones apply).
    arch_errors: Optional[Callable[[ModelArch], list[str]]] = None  # what megatron cannot build of an arch
    expected_shapes: Optional[Callable[[ModelArch, list[str]], dict]] = None  # HF name -> shape config.json implies
    dropped_on_import: Optional[Callable[[ModelArch, str], bool]] = None  # HF tensors import skips (DeepSeek MTP)
    export_config: Optional[Callable[[dict], dict]] = None  # config.json as exported, from the imported one
    # Parameters the shared count (aipo_mp.models.num_params) does not know: (arch, active) -> count.
    extra_params: Optional[Callable[[ModelArch, bool], int]] = None
    # HF tensors stored fused over the experts of a layer, each expert's slice [e] presented under a
    # per-expert name by the HF reader: ((stored name template, per-expert name template), ...).
    expert_slices: tuple[tuple[str, str], ...] = ()

    def rule_for(self, arch: ModelArch, megatron_name: str) -> tuple[Rule, dict]:
        """The rule of a global Megatron name and its index ({"i": layer, "e": expert}, as present)."""
        for rule in self.rules(arch):
            m = rule.pattern().match(megatron_name)
            if m:
                return rule, {k: int(v) for k, v in m.groupdict().items()}
        raise KeyError(f"no {self.name} mapping for Megatron parameter {megatron_name}")

    def hf_names(self, arch: ModelArch) -> list[str]:
        """Every HF tensor name a checkpoint of this architecture holds (per-expert layout)."""
        names = []
        for rule in self.rules(arch):
            if rule.te_alias or (rule.megatron == "output_layer.weight" and arch.tie_embeddings):
                continue
            names += [n for index in rule_indices(rule, arch) for n in rule.hf_at(index)]
        return names

    def fused_name(self, name: str) -> Optional[str]:
        """The stored tensor a per-expert name is a slice of (gpt-oss: `model.layers.{i}.mlp.experts.
        {e}.down_proj` -> `model.layers.{i}.mlp.experts.down_proj`); None for a tensor stored as such."""
        for fused, per_expert in self.expert_slices:
            m = re.match("^" + re.escape(per_expert).replace(r"\{i\}", r"(?P<i>\d+)")
                         .replace(r"\{e\}", r"\d+") + "$", name)
            if m:
                return fused.format(i=m["i"])
        return None

    def export_names(self, arch: ModelArch) -> list[str]:
        """Every HF tensor name an export writes: `hf_names`, with each layer's fused expert tensor
        (expert_slices) in place of its per-expert slices."""
        out, seen = [], set()
        for name in self.hf_names(arch):
            stored = self.fused_name(name) or name
            if stored not in seen:
                seen.add(stored)
                out.append(stored)
        return out


def rule_indices(rule: Rule, arch: ModelArch) -> list[dict]:
    """Every (layer, expert) index a rule's tensors exist at, in HF order."""
    if "{i}" not in rule.megatron:
        return [{}]
    layers = [i for i in range(arch.num_layers) if rule.held_by(arch, i)]
    if not rule.expert:
        return [{"i": i} for i in layers]
    return [{"i": i, "e": e} for i in layers for e in range(arch.num_experts)]


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
