"""Model construction (layer spec, TransformerConfig, GPTModel chunks for any TP/PP/VPP layout)
and the tensor side of the declarative mapping: fusing HF tensors into Megatron's, slicing them
over tensor parallelism, and loading HF weights into the chunks of any layout."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from aipo_mp.config import ModelArch, MoEConfig, ParallelConfig, PrecisionConfig
from aipo_mp.errors import ConfigError
from aipo_mp.models.family import (
    CHECKPOINT_KEYS_MAP,
    COLUMN,
    COPY,
    GLU,
    GLU_COLUMN,
    GLU_INTERLEAVED,
    NONE,
    ROW,
    TRANSPOSE,
    Family,
    Rule,
    SpecOptions,
)
from aipo_mp.models.rope import apply_rope_scaling, apply_yarn

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation_function(name: str) -> Callable:
    if name == "quick_gelu":  # gpt-oss: x·sigmoid(1.702·x), megatron's own (its fused GLU kernels know it)
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        return quick_gelu
    return ACTIVATIONS[name]


def to_megatron(rule: Rule, tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    if rule.transform == COPY:
        return tensors[0]
    if rule.transform == GLU:
        return torch.cat(tensors, dim=0)
    if rule.transform == GLU_INTERLEAVED:  # [.., 2I] with gate, up alternating -> [gate; up] rows
        t = tensors[0]
        return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1).t().contiguous() if t.dim() == 2 else \
            torch.cat([t[0::2], t[1::2]])
    if rule.transform == TRANSPOSE:
        return tensors[0].t().contiguous()
    q, k, v = (t if t.dim() == 2 else t[:, None] for t in tensors)  # a bias is one column
    ng, hd = arch.num_key_value_heads, arch.head_dim
    h = q.shape[-1]
    per_group = [q.reshape(ng, -1, h), k.reshape(ng, hd, h), v.reshape(ng, hd, h)]
    fused = torch.cat(per_group, dim=1).reshape(-1, h)
    return fused if tensors[0].dim() == 2 else fused[:, 0]


def to_hf(rule: Rule, tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    if rule.transform == COPY:
        return [tensor]
    if rule.transform == GLU:
        return list(torch.chunk(tensor, 2, dim=0))
    if rule.transform == GLU_INTERLEAVED:  # [gate; up] rows -> gate, up alternating (a matrix transposed)
        gate, up = torch.chunk(tensor, 2, dim=0)
        out = torch.stack([gate, up], dim=1).reshape(tensor.shape)  # rows g0, u0, g1, u1, ...
        return [out.t().contiguous() if tensor.dim() == 2 else out]
    if rule.transform == TRANSPOSE:
        return [tensor.t().contiguous()]
    ng, hd = arch.num_key_value_heads, arch.head_dim
    matrix = tensor if tensor.dim() == 2 else tensor[:, None]
    h = matrix.shape[-1]
    qpg = arch.num_attention_heads // ng * hd
    grouped = matrix.reshape(ng, qpg + 2 * hd, h)
    q, k, v = torch.split(grouped, [qpg, hd, hd], dim=1)
    parts = [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]
    return parts if tensor.dim() == 2 else [p[:, 0] for p in parts]


def tp_slice(tensor: torch.Tensor, split: str, rank: int, size: int) -> torch.Tensor:
    if split == NONE or size == 1:
        return tensor
    if split == COLUMN:
        return torch.chunk(tensor, size, dim=0)[rank]
    if split == ROW:
        return torch.chunk(tensor, size, dim=1)[rank]
    gate, up = torch.chunk(tensor, 2, dim=0)
    return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], dim=0)


def tp_merge(shards: list[torch.Tensor], split: str) -> torch.Tensor:
    if split == NONE or len(shards) == 1:
        return shards[0]
    if split == COLUMN:
        return torch.cat(shards, dim=0)
    if split == ROW:
        return torch.cat(shards, dim=1)
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])])


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def choose_backend(requested: str) -> str:
    if requested == "te" and not te_available():
        raise ConfigError(
            "precision.backend=te needs Transformer Engine on a CUDA machine; install the `te` extra "
            "or use precision.backend=local"
        )
    if requested == "auto":
        return "te" if te_available() else "local"
    return requested


def local_layer_spec(opts: SpecOptions, num_experts: int = 0):
    """The local (torch) layer; num_experts > 0: a mixture-of-experts MLP (megatron's MoELayer
    with one MLP per expert), whose pre-MLP norm keeps its own checkpoint key as under TE."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from aipo_mp.models.layers import RowParallelLinearWithPostNorm, TorchCoreAttention, rms_norm_builder

    norm = rms_norm_builder(opts.zero_centered_norm)
    if opts.post_norms:
        out_proj = ModuleSpec(module=RowParallelLinearWithPostNorm,
                              params={"post_norm_zero_centered": opts.zero_centered_norm})
    else:
        out_proj = RowParallelLinear
    core_attention = ModuleSpec(
        module=TorchCoreAttention,
        params={
            "logit_softcapping": opts.attn_logit_softcapping,
            "window_size": opts.window_size,
            "sliding_layers": opts.sliding_layers,
            **({"attention_sinks": True} if opts.attention_sinks else {}),
        },
    )
    if opts.mla:
        attention = mla_attention_spec(core_attention, norm)
    else:
        attention = ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear,
                core_attention=core_attention,
                linear_proj=out_proj,
                q_layernorm=norm if opts.qk_norm else IdentityOp,
                k_layernorm=norm if opts.qk_norm else IdentityOp,
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=moe_mlp_spec(num_experts, use_te=False, expert_bias=opts.linear_bias) if num_experts else ModuleSpec(
                module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=out_proj)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=checkpoint_keys_map(moe=bool(num_experts)),
        ),
    )


def mla_attention_spec(core_attention, norm):
    """megatron's multi-latent attention on local modules: column-parallel down projections (the
    latent is gathered over TP), head-split up projections, RMSNorms on the two latents, and the
    project's torch core attention (keys and values of different head sizes)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=core_attention,
            linear_proj=RowParallelLinear,
            q_layernorm=norm,
            kv_layernorm=norm,
        ),
    )


def moe_mlp_spec(num_experts: int, use_te: bool, expert_bias: bool = False):
    """megatron's MoELayer: per-expert MLPs (SequentialMLP) locally, TE's grouped GEMM on GPUs.
    expert_bias (gpt-oss): the experts' output projection hands back a copy (see
    ExpertRowParallelLinear)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    spec = get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=use_te)
    if expert_bias and not use_te:
        from aipo_mp.models.layers import ExpertRowParallelLinear

        spec.submodules.experts.submodules.linear_fc2 = ExpertRowParallelLinear
    return spec


def checkpoint_keys_map(moe: bool) -> dict:
    """The local spec's norm keys renamed to the TE spec's; a TE MoE layer keeps pre_mlp_layernorm."""
    return {k: v for k, v in CHECKPOINT_KEYS_MAP.items() if not (moe and k == "pre_mlp_layernorm.")}


def te_layer_spec(opts: SpecOptions, num_experts: int = 0):
    """Transformer Engine layers (FP8-capable). Gemma-2's soft-capping and post-norms are not in
    TE's fused attention, so Gemma-2 keeps the local attention and norms on this backend."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    if not opts.te_fused_attention:
        return local_layer_spec(opts, num_experts)
    return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts or None, moe_grouped_gemm=bool(num_experts),
                                                      qk_layernorm=opts.qk_norm)


def moe_settings(arch: ModelArch, par: ParallelConfig, moe: MoEConfig, backend: str) -> dict:
    """TransformerConfig's MoE fields. The router reproduces transformers: softmax scores, top-k,
    renormalised (norm_topk_prob) = softmax over the top-k logits (pre_softmax off); without
    renormalisation the top-k of the full softmax (pre_softmax on)."""
    if not arch.num_experts:
        return {}
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_intermediate_size,
        moe_router_topk=arch.num_experts_per_tok,
        **(grouped_sigmoid_routing(arch, moe) if arch.family == "deepseek_v3" else dict(
            moe_router_score_function="softmax", moe_router_pre_softmax=not arch.norm_topk_prob)),
        moe_layer_freq=[0 if i in arch.dense_layers else 1 for i in range(arch.num_layers)],
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_token_dispatcher_type=moe.dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_grouped_gemm=backend == "te",
        moe_permute_fusion=False,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
    )


def grouped_sigmoid_routing(arch: ModelArch, moe: MoEConfig) -> dict:
    """DeepSeek-V3's router: sigmoid scores in fp32, the expert bias for selection only,
    group-limited top-k, renormalised weights times routed_scaling_factor, a shared expert.
    The bias update (aux-loss-free balancing) runs only with moe.expert_bias_update_rate > 0:
    at 0 megatron's update adds exactly nothing, so the bias stays what the checkpoint holds
    (freezing the router weights alone would not freeze it)."""
    return dict(
        moe_router_score_function="sigmoid",
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_router_num_groups=arch.n_group if arch.n_group > 1 else None,
        moe_router_group_topk=arch.topk_group if arch.n_group > 1 else None,
        moe_router_topk_scaling_factor=arch.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=arch.shared_expert_intermediate_size or None,
    )


def mla_settings(arch: ModelArch) -> dict:
    """MLATransformerConfig's fields. megatron applies the yarn mscale of rotary_scaling_factor
    to the softmax and to cos/sin, as transformers does for yarn configs."""
    yarn = arch.yarn
    return dict(
        q_lora_rank=arch.q_lora_rank or None,
        kv_lora_rank=arch.kv_lora_rank,
        qk_head_dim=arch.qk_nope_head_dim,
        qk_pos_emb_head_dim=arch.qk_rope_head_dim,
        v_head_dim=arch.v_head_dim,
        rope_type="yarn",
        rotary_base=arch.rope_theta,
        rotary_scaling_factor=yarn["factor"],
        original_max_position_embeddings=yarn["original_max_position_embeddings"],
        beta_fast=yarn["beta_fast"],
        beta_slow=yarn["beta_slow"],
        mscale=yarn["mscale"],
        mscale_all_dim=yarn["mscale_all_dim"],
    )


def transformer_config(arch: ModelArch, par: ParallelConfig, prec: PrecisionConfig, opts: SpecOptions,
                       recompute: str = "none", extra: Optional[dict] = None, moe: Optional[MoEConfig] = None,
                       backend: str = "local"):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    from aipo_mp.runtime import platform

    dtype = torch.bfloat16 if prec.dtype == "bf16" else torch.float32
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.rms_norm_eps,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=activation_function(opts.activation),
        softmax_scale=opts.softmax_scale,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if par.vpp > 1 else None,
        context_parallel_size=par.cp,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
        deallocate_pipeline_outputs=False,
        **platform.p2p_settings(),
    )
    if opts.linear_bias:  # gpt-oss: q/k/v/o, router and expert biases
        kwargs.update(add_bias_linear=True, add_qkv_bias=True)
    if opts.glu_linear_offset or opts.activation_clamp is not None:  # gpt-oss's clamped SwiGLU
        kwargs.update(glu_linear_offset=opts.glu_linear_offset, activation_func_clamp_value=opts.activation_clamp)
    kwargs.update(platform.gpu_fast_paths(activation_function(opts.activation)))
    if recompute != "none":
        kwargs["recompute_granularity"] = recompute
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    if prec.fp8:
        kwargs.update(fp8=prec.fp8, fp8_recipe=prec.fp8_recipe)
    kwargs.update(moe_settings(arch, par, moe or MoEConfig(), backend))
    kwargs.update(extra or {})
    if kwargs.get("moe_router_enable_expert_bias"):
        platform.apply_expert_bias_fix()
    if opts.mla:
        platform.apply_mla_shims()
        return MLATransformerConfig(**kwargs, **mla_settings(arch))
    return TransformerConfig(**kwargs)


@dataclass
class BuiltModel:
    """The model chunks of this rank (one per virtual pipeline stage) and what built them."""

    chunks: list
    family: Family
    arch: ModelArch
    config: object  # TransformerConfig
    options: SpecOptions = field(default_factory=SpecOptions)


def build_model(family: Family, arch: ModelArch, par: ParallelConfig, prec: PrecisionConfig,
                recompute: str = "none", initialize: bool = True, moe: Optional[MoEConfig] = None) -> BuiltModel:
    """GPTModel chunks for this rank. Needs initialize_model_parallel() first.

    initialize=False skips random initialization when every weight is loaded afterwards (with
    CPU initialization megatron builds each tensor's full fp32 master on every rank first)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from aipo_mp.models.layers import rms_norm_builder

    opts = family.spec_options(arch)
    backend = choose_backend(prec.backend)
    config = transformer_config(arch, par, prec, opts, recompute, extra={"perform_initialization": initialize},
                                moe=moe, backend=backend)
    layer_spec = te_layer_spec if backend == "te" else local_layer_spec
    dense, sparse = layer_spec(opts), (layer_spec(opts, arch.num_experts) if arch.num_experts else None)
    vpp = par.vpp if par.vpp > 1 else None
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        first = get_transformer_layer_offset(config, vp_stage=stage)
        count = get_num_layers_to_build(config, vp_stage=stage)
        spec = TransformerBlockSubmodules(
            layer_specs=[dense if sparse is None or i in arch.dense_layers else sparse
                         for i in range(first, first + count)],
            layer_norm=rms_norm_builder(opts.zero_centered_norm),
        )
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            vp_stage=stage,
        )
        attach_family_hooks(model, opts)
        apply_rope_scaling(model, arch.rope_scaling)
        if not opts.mla:  # gpt-oss's yarn (DeepSeek-V3's latent attention does its own)
            apply_yarn(model, arch.head_dim, arch.rope_theta, arch.yarn)
        chunks.append(model)
    built = BuiltModel(chunks, family, arch, config, opts)
    if not initialize:
        mark_tensor_parallel_params(built)
    return built


def freeze_routers(chunks: list) -> int:
    """moe.freeze_router: the MoE routers get no gradient and no optimizer state (call before the
    model is wrapped for data parallelism). Returns how many router weights were frozen."""
    frozen = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if ".mlp.router." in name:
                p.requires_grad_(False)
                frozen += 1
    return frozen


def mark_tensor_parallel_params(built: BuiltModel) -> None:
    """megatron tags a sharded weight (tensor_model_parallel, partition_dim) only while it
    initializes it; without initialization, tag them from the mapping table, which knows how
    every parameter is split. Gradient-norm and checkpoint code rely on these tags."""
    split_dim = {COLUMN: 0, GLU_COLUMN: 0, ROW: 1}
    for chunk in built.chunks:
        params = dict(chunk.named_parameters())
        for local, gname in global_param_names(chunk).items():
            param = params[local]
            if hasattr(param, "tensor_model_parallel"):
                continue
            dim = split_dim.get(built.family.rule_for(built.arch, gname)[0].split)
            param.tensor_model_parallel = dim is not None
            param.partition_dim = -1 if dim is None else dim
            param.partition_stride = 1


def attach_family_hooks(model, opts: SpecOptions) -> None:
    """Gemma's embedding scale and final-logit soft-capping, as forward hooks so every caller of
    the model (training, reference pass, verification) sees the same numbers."""
    if opts.embedding_scale and getattr(model, "pre_process", False):
        scale = opts.embedding_scale

        def scale_embedding(_module, _inputs, output):
            # HF computes the normalizer in the model's dtype.
            return output * torch.tensor(scale, dtype=output.dtype)

        model.embedding.register_forward_hook(scale_embedding)
    if opts.final_logit_softcapping and getattr(model, "post_process", False):
        cap = opts.final_logit_softcapping

        def softcap_logits(_module, _inputs, output):
            logits, bias = output
            return torch.tanh(logits / cap) * cap, bias

        model.output_layer.register_forward_hook(softcap_logits)


# ---------------------------------------------------------------------------------------------
# Loading HF weights into the chunks of any layout
# ---------------------------------------------------------------------------------------------


LOCAL_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..*)$|^(mlp\.experts\.linear_fc[12]\.weight)(\d+)()$")


def mapped_buffer_names(built: BuiltModel, chunk) -> dict[str, str]:
    """Local -> global names of the buffers the mapping table holds (DeepSeek's expert bias)."""
    names = global_param_names(chunk, buffers=True)
    return {local: g for local, g in names.items() if any(r.buffer and r.pattern().match(g)
                                                          for r in built.family.rules(built.arch))}


def global_param_names(chunk, buffers: bool = False) -> dict[str, str]:
    """Local parameter name -> global name: the layer index across pipeline/virtual stages, and
    the expert index across expert-parallel ranks (rank r holds experts r*E/EP ... (r+1)*E/EP-1).
    buffers: the same for the chunk's buffers instead."""
    out = {}
    layers = chunk.decoder.layers
    for name, _ in (chunk.named_buffers() if buffers else chunk.named_parameters()):
        m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
        if not m:
            out[name] = name
            continue
        layer = layers[int(m.group(1))]
        rest = m.group(2)
        e = LOCAL_EXPERT.match(rest)
        if e:
            head, local, tail = (e.group(1), e.group(2), e.group(3)) if e.group(1) else e.group(4, 5, 6)
            experts = layer.mlp.experts
            rest = f"{head}{experts.ep_group.rank() * experts.num_local_experts + int(local)}{tail}"
        out[name] = f"decoder.layers.{layer.layer_number - 1}.{rest}"
    return out


def parallel_rank_and_size(rule: Rule) -> tuple[int, int]:
    """The group a rule's tensor is split over: expert-TP for experts, TP for the rest."""
    from megatron.core import parallel_state

    from aipo_mp.models.layers import tp_rank_and_size

    if rule.expert:
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return tp_rank_and_size()


def load_hf_weights(built: BuiltModel, read: Callable[[str], torch.Tensor]) -> None:
    """Fill every parameter (and mapped buffer) of this rank from HF tensors given by `read(name)`."""
    for chunk in built.chunks:
        params = {**dict(chunk.named_parameters()), **dict(chunk.named_buffers())}
        for local, gname in {**global_param_names(chunk), **mapped_buffer_names(built, chunk)}.items():
            rule, index = built.family.rule_for(built.arch, gname)
            hf = [read(n) for n in rule.hf_at(index)]
            full = to_megatron(rule, hf, built.arch)
            shard = tp_slice(full, rule.split, *parallel_rank_and_size(rule))
            param = params[local]
            if tuple(shard.shape) != tuple(param.shape):
                raise ConfigError(
                    f"shape mismatch for {gname} (from {', '.join(rule.hf_at(index))}): "
                    f"checkpoint gives {tuple(full.shape)} -> shard {tuple(shard.shape)}, model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))


def megatron_state_to_hf(built: BuiltModel, gathered: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global (TP-merged) Megatron tensors -> HF tensors."""
    out = {}
    for gname, tensor in gathered.items():
        rule, index = built.family.rule_for(built.arch, gname)
        if rule.megatron == "output_layer.weight" and built.arch.tie_embeddings:
            continue
        for n, t in zip(rule.hf_at(index), to_hf(rule, tensor, built.arch)):
            out[n] = t
    return out
