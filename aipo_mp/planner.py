"""Memory and FLOPs model of a training layout, for scaling studies (`aipo-mp plan`).

Pure arithmetic on the architecture: nothing here imports torch or megatron, so a plan for
Mistral-Large on 512 GPUs takes milliseconds on a laptop. The formulas follow how this project
allocates and runs the model (megatron-core GPTModel, packed pairs, fp32 DDP gradient buffers,
megatron's distributed optimizer on GPUs); docs/planner.md has the same formulas with the
assumptions behind them.

Notation: h hidden, f ffn (intermediate), a attention heads, g key/value heads (query groups),
d head_dim, hq = a·d, hkv = g·d, V vocab, L layers, t = tp, s = seq_length (one packed row), b =
rows per micro-batch (1 in this trainer), e = bytes per element of the training dtype (2 for bf16).
Mixture of experts: E experts, k = top-k, I = moe_intermediate_size, ep / etp = expert parallel /
expert tensor parallel sizes, d_e = expert-DP = t·d_p/(ep·etp) (the expert mesh of a pipeline stage
is etp x ep x d_e over the same t x d_p ranks as the dense mesh).

Parameters per TP rank (megatron shapes, no biases, no padded vocabulary):
    per layer   (a+2g)·d/t·h  (fused QKV)  + h·a·d/t  (proj)  + 2f/t·h  (fc1, gated)  + h·f/t  (fc2)
                + n_norm·h  (RMSNorm weights, replicated; n_norm = 2, Gemma-2: 4)
    stage 0     + V/t·h  (embedding)
    last stage  + h  (final norm)  + V/t·h  (output layer; with tied embeddings only when pp > 1,
                where the last stage holds a trained copy that is all-reduced with the embedding)
    MoE layer   the attention and norms above; instead of fc1/fc2: E·h (router, replicated over
                TP and EP) + E/ep·(2·I/etp·h + h·I/etp) (the rank's experts, each a gated MLP);
                layers in `dense_layers` keep the dense MLP; DeepSeek-V3 adds a shared expert of
                width S (3·S/t·h, split like the dense MLP)
    latent attention (DeepSeek-V3, instead of QKV and proj; see mla_tensors): q down [q_lora/t, h]
                + q up [a·(nope + rope)/t, q_lora] (or q [a·(nope + rope)/t, h]) + kv down
                [(kv_lora + rope)/t, h] + kv up [a·(nope + v)/t, kv_lora] + proj [h, a·v/t], and
                the q_lora and kv_lora latent norms (replicated)
Each pipeline rank holds L/pp layers (with vpp > 1 in vpp chunks of L/(pp·vpp), chunk c of rank r
from layer c·L/vpp + r·L/(pp·vpp), as megatron offsets them); the binding rank is the one with the
most parameters.

Static bytes per GPU (P = parameters of the rank, d_p = data-parallel size):
    weights     e·P                      (bf16 params, or fp32 when dtype=fp32)
    gradients   4·P                      (megatron DDP buffer, grad_reduce_in_fp32=True, not sharded)
    optimizer   bf16: (4 master + 4 + 4 Adam moments)·P, fp32: (4 + 4)·P;  ≈ / d_p with the
                distributed optimizer (ZeRO-1 sharding of the states; each DP rank's exact share
                from megatron's gradient-buffer layout, see dp_shard_numels). With ep > 1 the
                expert weights (megatron: allreduce=False) have their own gradient buffer,
                reduced and sharded over d_e instead: (P − P_exp)/d_p + P_exp/d_e. With ep = 1
                they share the dense buffer (and need etp = t: see layout_problems)
    moe.freeze_router: the routers get no gradient buffer and no optimizer state

Activations of one transformer layer for one micro-batch (bytes; the Korthikanti et al. 2022
"Reducing Activation Recomputation in Large Transformer Models" accounting, which gives
s·b·h·(34 + 5·a·s/h) for GPT with 4h MLP and dropout, adapted to this model: no dropout masks,
GQA, gated MLP, fused or unfused attention). Every term is divided by t with sequence parallel
(SP, the default when t > 1); without SP the "replicated" terms are not:
    replicated  n_norm·c·h + 2·e·h        norm inputs (c = e for Transformer Engine's fused
                                           LayerNormLinear, 4 + 4 for the local fp32 Gemma norm
                                           (fp32 input and fp32 normalised copy), 4 + e for the
                                           local Llama norm) + inputs of the QKV and fc1 (MoE:
                                           router) GEMMs
    sharded     e·(2·hq + 2·hkv)          q, k, v after RoPE and the attention output (proj input)
                + e·5f                    fc1 output [2f], act(gate) [f], up + glu_linear_offset (a
                                           copy megatron's glu makes) [f], the product (fc2 input) [f]
    core attn   fused (TE's flash attention, or this repo's TorchCoreAttention: torch's SDPA per
                sequence):  + 4·a (fp32 log-sum-exp per head)
                unfused (logit soft-capping, Gemma-2, every backend; per sequence of L = s_seq =
                s/(2·pairs per row) tokens): fp32 q and k (k repeated over the query groups) and
                the repeated v replace q, k, v: + 8·hq + e·hq − e·(hq + 2·hkv)
                                     + L·a·(4 + e + 4·[softcap]) (fp32 softmax, probs in dtype,
                                       fp32 tanh output) per token, + L² bytes of mask per sequence
    latent attn (DeepSeek-V3, mla_bytes_per_token) instead of e·(2·hq + 2·hkv): e·a·(2·(nope +
                rope) + 2·v) sharded, + (q_lora + kv_lora)·(norm + e) replicated (the latent
                norms' inputs and the up projections' inputs); shared expert: + e·5·S sharded
    MoE layer   instead of e·5f, per token entering the layer (/t with SP), see moe_bytes_per_token:
                k·(8 + 4) + E·(1 + e) + 8·k   router top-k indices and fp32 probabilities, the
                                              routing mask/probabilities and permutation index
                + k·etp·e·(h + 1) + 6·e·k·I   the k dispatched rows (gathered over etp) with their
                                              probability, and the expert MLPs' activations (the
                                              dense 5 copies + the probability-scaled product)
                (balanced routing; the busiest EP rank keeps load_max/load_mean times the expert part)
Multiply by s·b. Left out: RoPE's cos/sin tables (4·d·e per token and layer, 1-2 % at 100B+ sizes).
Checked against the tensors autograd actually saves (saved_tensors_hooks) for this repo's local
backend on CPU, tiny models (tests/dist/test_planner_vs_trainer.py): within 25 %, ~6-14 % under
for TP=2 (the RoPE tables are not sharded), MoE 0.80-1.03 of the saved bytes (the spread is the
routing imbalance between EP ranks). Recomputation:
    selective   core attention recomputed: the unfused extras and the s² term disappear
                (no change with flash attention)
    full        each layer keeps only its input, e·h (/t with SP), per layer and micro-batch in
                flight, plus one layer's full activations as working memory for the backward
Micro-batches in flight (1F1B): pipeline rank r holds min(pp − r, M) micro-batches (the first
stage pp of them: as Korthikanti notes, the first stage then holds about one micro-batch's
activations for the whole model). Interleaved (vpp > 1): rank r holds
min(2·(pp − r − 1) + (vpp − 1)·pp + 1, M·vpp) chunk passes of L/(pp·vpp) layers, i.e. the first
stage holds pp·(1 + (pp − 1)/(pp·vpp)) micro-batches' worth. With pp > 1 each in-flight pass also
keeps its output tensor e·s·b·h/t (deallocate_pipeline_outputs=False).
Last stage: final norm input + output-layer input, and logits s·b·V/t·(4 + e): the fp32 softmax
the vocab-parallel cross entropy keeps for the backward plus the logits in the training dtype.
Runtime overhead: a fixed 2 GiB per GPU (CUDA context, NCCL buffers, cuBLAS workspaces); a layout
"fits" when its peak leaves >= 10 % of the GPU memory free (allocator fragmentation, spikes).

Reference (one forward pass per pair, before training):
    none        objectives without a reference (SimPO): nothing
    initial     reference = the policy's own starting weights: nothing extra
    model       a second frozen model in the same layout, bf16 weights e·P, freed after the
                precompute: peak of that phase = static training state + e·P + one micro-batch's
                forward working set; training then runs without it
    model-live  the reference weights stay resident through training: + e·P

Sampling (vLLM, a separate stage on the same GPUs): weights 2·P_total/t_v, KV cache per token
2·L·ceil(g/t_v)·d·2 bytes (K and V, bf16; vLLM replicates KV heads when t_v > g; latent attention:
2·L·(kv_lora + rope), the latent whole on every rank); KV tokens that
fit = (0.9·memory − weights − 2 GiB activations/CUDA graphs) / KV bytes per token.

Step time (model FLOPs, Megatron/PaLM accounting):
    forward FLOPs per token  F = 2·N + 4·L·hq·s_seq  (latent attention: 2·L·a·(nope + rope + v)·s_seq)
        N      = parameters other than the input embedding (the embedding is a lookup; the output
                 layer's V·h GEMM is counted, once, also when tied); for a mixture of experts the
                 ACTIVE ones: routers + k experts per MoE layer (num_params(arch, active=True))
        s_seq  = s / (2·pairs_per_row): the length of one sequence, since attention never
                 crosses a sequence boundary in a packed row (chosen and rejected are separate)
    policy   3·F per token (forward + backward), +F with full recomputation (hardware FLOPs)
    reference  F per token, once per pair (precomputed in one pipelined pass over the round's
               pairs, so without a bubble; amortised over the round's steps)
    tokens per step  = global_batch_pairs / pairs_per_row · s  (one row per pair by default)
    time  = (FLOPs / (GPUs · peak · efficiency) + MoE token exchange) · (1 + pipeline bubble
              (pp − 1)/(vpp·M))
            + data-parallel gradient traffic (not overlapped in this trainer): reduce-scatter of
              fp32 grads + all-gather of bf16 params, (d_p − 1)/d_p·P·(4 + e) bytes per GPU with
              the distributed optimizer (all-reduce 2·(d_p − 1)/d_p·4·P without), over NVLink when
              the DP group sits in one node (tp·dp <= gpus per node), else over the network; with
              ep > 1 the expert weights P_exp over d_e: (d_e − 1)/d_e·P_exp·(4 + e)
    MoE token exchange (megatron's alltoall dispatcher, not overlapped): per MoE layer and forward
    pass of a micro-batch each GPU sends 2·T·k·h·e·(ep − 1)/ep bytes (dispatch + combine of its
    T = s·b/t tokens' k copies) and 2·(etp − 1)·T·k·h·e over the expert-TP group; the backward
    moves the same again, a recomputed forward once more, the reference forward once per row.
    EP peers in the GPU's node (min(ep, gpus per node / etp) − 1 of ep − 1) are reached over
    NVLink, the others over the network.
    efficiency (default 0.40) is the fraction of bf16 dense peak the GEMMs reach on a well-tuned
    layout, tensor-parallel communication inside the node included; MFU printed = model FLOPs
    (policy 3·F + reference F, no recompute) / (time · GPUs · peak).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from aipo_mp.config import ModelArch, ParallelConfig
from aipo_mp.errors import ConfigError, UserError
from aipo_mp.models import get_family, num_params
from aipo_mp.validate import divisors, layout_errors

GiB = 1024**3


class PlanError(ConfigError):
    """A user mistake in the planner's arguments (printed as one `error:` line, exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops: float  # bf16 dense tensor-core peak
    memory_bytes: int  # total memory as nvidia-smi reports it
    nominal: str
    intra_node_gbs: float  # achievable NCCL bus bandwidth inside a node (NVLink/NVSwitch), GB/s
    inter_node_gbs: float  # achievable per-GPU bandwidth across nodes (one NIC per GPU), GB/s


MiB = 1024**2
GPUS = {
    "h100-80gb": GPUSpec("h100-80gb", 989.0, 81559 * MiB, "80 GB", 360.0, 40.0),  # NVLink4, 400G NDR
    "h200-141gb": GPUSpec("h200-141gb", 989.0, 143771 * MiB, "141 GB", 360.0, 40.0),
    "a100-80gb": GPUSpec("a100-80gb", 312.0, 81920 * MiB, "80 GB", 230.0, 20.0),  # NVLink3, 200G HDR
}

RUNTIME_OVERHEAD = 2 * GiB  # CUDA context, NCCL buffers, cuBLAS workspaces per GPU
VLLM_OVERHEAD = 2 * GiB  # vLLM's profiled activations and CUDA graphs
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
RECOMPUTE = ("none", "selective", "full")
REFERENCE_MODES = ("none", "initial", "model", "model-live")


def get_gpu(gpu: str | GPUSpec) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    if gpu not in GPUS:
        raise PlanError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    return GPUS[gpu]


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    sequence_parallel: Optional[bool] = None  # None: on whenever tp > 1
    ep: int = 1  # expert parallel: each MoE layer's experts split over ep ranks
    etp: int = 1  # expert tensor parallel: each expert's FFN split over etp ranks

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: the ranks of a pipeline stage holding the same expert shard
        (megatron's expert mesh per stage is etp x ep x expert-DP over the stage's tp x dp ranks)."""
        return max(self.tp * self.dp // (self.ep * self.etp), 1)

    def short(self, moe: bool = False) -> str:
        experts = f" ep={self.ep} etp={self.etp}" if moe or self.ep * self.etp > 1 else ""
        return f"tp={self.tp} pp={self.pp} vpp={self.vpp} dp={self.dp}{experts}"


def _div(n: int, k: int, what: str) -> int:
    if k <= 0 or n % k:
        raise PlanError(f"{what}: {n} is not divisible by {k}")
    return n // k


def layout_problems(arch: ModelArch, layout: Layout, gpus_per_node: Optional[int] = None,
                    global_batch_pairs: Optional[int] = None, seq_length: Optional[int] = None) -> list[str]:
    """Why a layout cannot run (empty when it can): the config's own checks plus the planner's."""
    par = ParallelConfig(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, sequence_parallel=layout.sp, ep=layout.ep,
                         etp=layout.etp)
    errors = layout_errors(arch, par, layout.world)
    if layout.dp < 1:
        errors.append(f"dp={layout.dp}: must be >= 1")
    if arch.intermediate_size % layout.tp:
        errors.append(f"tp={layout.tp} does not divide the ffn size {arch.intermediate_size}")
    if arch.shared_expert_intermediate_size % layout.tp:
        errors.append(f"tp={layout.tp} does not divide the shared expert's ffn size {arch.shared_expert_intermediate_size}")
    if arch.kv_lora_rank and (arch.q_lora_rank % layout.tp or (arch.kv_lora_rank + arch.qk_rope_head_dim) % layout.tp):
        errors.append(f"tp={layout.tp} does not divide the latent attention's q_lora_rank ({arch.q_lora_rank}) and "
                      f"kv_lora_rank + qk_rope_head_dim ({arch.kv_lora_rank + arch.qk_rope_head_dim})")
    if gpus_per_node and (layout.tp > gpus_per_node or gpus_per_node % layout.tp):
        errors.append(f"tp={layout.tp} must divide the {gpus_per_node} GPUs of a node (TP stays on NVLink)")
    if arch.num_experts and layout.etp > layout.tp:
        errors.append(f"etp={layout.etp} must be <= tp={layout.tp} (expert tensor parallelism stays inside the "
                      "dense TP group, on NVLink)")
    elif arch.num_experts and layout.ep == 1 and layout.etp != layout.tp:
        # megatron marks expert weights for the dense gradient buffer when ep = 1, reduced over the
        # dense DP group only: copies on the tp/etp ranks of a TP group would train apart
        # (measured: tiny Qwen3-MoE at tp=2, ep=1, etp=1 drifts from one process; etp=2 matches).
        errors.append(f"ep=1 needs etp=tp={layout.tp} (without expert parallelism the experts are split like "
                      f"the dense MLP); etp={layout.etp} would leave expert copies whose gradients are not reduced")
    if global_batch_pairs is not None and global_batch_pairs % max(layout.dp, 1):
        errors.append(f"global batch {global_batch_pairs} pairs is not divisible by dp={layout.dp}")
    if seq_length is not None and layout.sp and seq_length % layout.tp:
        errors.append(f"seq_length {seq_length} is not a multiple of tp={layout.tp} (sequence parallel)")
    return errors


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass
class StageParams:
    """Parameters of one pipeline rank, as one of its TP ranks allocates them."""

    stage: int
    layers: int
    layer_sharded: int  # TP-sharded layer weights (QKV, proj, and fc1, fc2 of dense MLPs) of the stage's layers
    layer_norms: int  # replicated norm weights of the stage's layers
    embedding: int = 0
    output_layer: int = 0
    final_norm: int = 0
    tied_copy: bool = False  # output_layer is the last stage's copy of a tied embedding
    moe_layers: int = 0  # of `layers`, those with a mixture-of-experts MLP
    experts: int = 0  # expert weights on this rank: E/ep experts, each FFN split over etp
    routers: int = 0  # router weights [E, h] of the MoE layers (replicated over TP and EP)

    @property
    def total(self) -> int:
        return (self.layer_sharded + self.layer_norms + self.embedding + self.output_layer + self.final_norm
                + self.experts + self.routers)

    @property
    def sharded(self) -> int:
        return self.layer_sharded + self.embedding + self.output_layer

    @property
    def replicated(self) -> int:
        return self.layer_norms + self.final_norm + self.routers

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers


@dataclass
class ParamCounts:
    tp: int
    pp: int
    vpp: int
    per_layer: int  # one layer on one TP rank (an MoE layer, experts of the rank included, for an MoE model)
    stages: list[StageParams]
    ep: int = 1
    etp: int = 1

    @property
    def max_per_rank(self) -> int:
        return max(s.total for s in self.stages)

    @property
    def binding_stage(self) -> int:
        return max(self.stages, key=lambda s: (s.total, -s.stage)).stage

    @property
    def model_total(self) -> int:
        """The whole model's distinct parameters, rebuilt from the shards (a tied copy counted once;
        each rank holds 1/(ep·etp) of every MoE layer's experts)."""
        total = sum(s.sharded * self.tp + s.replicated + s.experts * self.ep * self.etp for s in self.stages)
        return total - sum(s.output_layer * self.tp for s in self.stages if s.tied_copy)

    def per_rank(self) -> list[int]:
        return [s.total for s in self.stages]


def layer_params(arch: ModelArch, tp: int = 1) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one transformer layer with a dense MLP on one TP rank."""
    sharded, norms = attention_params(arch, tp)
    h, f = arch.hidden_size, arch.intermediate_size
    fc1 = _div(2 * f, tp, "fc1 output features / tp") * h
    fc2 = h * _div(f, tp, "ffn size / tp")
    return sharded + fc1 + fc2, norms


def attention_params(arch: ModelArch, tp: int = 1) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one layer without its MLP: attention and the norms."""
    if arch.kv_lora_rank:
        return mla_params(arch, tp)
    h, d = arch.hidden_size, arch.head_dim
    a, g = arch.num_attention_heads, arch.num_key_value_heads
    qkv_features = _div((a + 2 * g) * d, tp, "QKV output features / tp")
    qkv = qkv_features * h + (qkv_features if arch.qkv_bias else 0)  # Qwen2: the bias is split like the rows
    proj = h * _div(a * d, tp, "attention output features / tp")
    qk_norms = 2 * d if arch.qk_norm else 0  # Qwen3: one head_dim weight each for q and k, on every TP rank
    return qkv + proj, norms_per_layer(arch) * h + qk_norms


def mla_tensors(arch: ModelArch, tp: int = 1) -> list[tuple[int, bool]]:
    """DeepSeek-V3's latent attention on one TP rank, as this project's local spec builds it:
    (elements, replicated) per tensor in megatron's registration order: linear_proj [h, a/t·v],
    linear_q_down_proj [q_lora/t, h] and linear_q_up_proj [a/t·qk, q_lora] (or linear_q_proj
    [a/t·qk, h]), linear_kv_down_proj [(kv_lora + rope)/t, h], linear_kv_up_proj
    [a/t·(nope + v), kv_lora], then the q and kv latent norms. The down projections are
    column-parallel (each rank computes 1/tp of the latent, then it is gathered); the up and
    output projections are split by heads; the latent norms are replicated."""
    h, a, ql, kvl = arch.hidden_size, arch.num_attention_heads, arch.q_lora_rank, arch.kv_lora_rank
    qk, rope = arch.qk_nope_head_dim + arch.qk_rope_head_dim, arch.qk_rope_head_dim
    heads = _div(a, tp, "attention heads / tp")
    out = [(h * heads * arch.v_head_dim, False)]
    if ql:
        out += [(_div(ql, tp, "q_lora_rank / tp") * h, False), (heads * qk * ql, False)]
    else:
        out += [(heads * qk * h, False)]
    out += [(_div(kvl + rope, tp, "(kv_lora_rank + qk_rope_head_dim) / tp") * h, False),
            (heads * (arch.qk_nope_head_dim + arch.v_head_dim) * kvl, False)]
    return out + ([(ql, True)] if ql else []) + [(kvl, True)]


def mla_params(arch: ModelArch, tp: int = 1) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one latent-attention layer without its MLP."""
    tensors = mla_tensors(arch, tp)
    latent_norms = sum(n for n, replicated in tensors if replicated)
    return sum(n for n, replicated in tensors if not replicated), norms_per_layer(arch) * arch.hidden_size + latent_norms


def shared_expert_params(arch: ModelArch, tp: int = 1) -> int:
    """DeepSeek-V3's shared expert of one MoE layer on one TP rank: a gated MLP of width S =
    shared_expert_intermediate_size, split over TP like the dense MLP (fc1 [2·S/t, h], fc2 [h, S/t])."""
    width = _div(arch.shared_expert_intermediate_size, tp, "shared expert ffn size / tp")
    return 3 * width * arch.hidden_size


def expert_params(arch: ModelArch, ep: int = 1, etp: int = 1) -> int:
    """Expert weights of one MoE layer on one rank: E/ep experts, each a gated MLP with fc1
    [2·I/etp, h] and fc2 [h, I/etp] (I = moe_intermediate_size)."""
    h = arch.hidden_size
    local = _div(arch.num_experts, ep, "experts / ep")
    width = _div(arch.moe_intermediate_size, etp, "expert ffn size / etp")
    return local * (2 * width * h + h * width)


def moe_layer_indices(arch: ModelArch) -> set[int]:
    """0-based layers with a mixture-of-experts MLP (all but `dense_layers`; none for a dense model)."""
    if not arch.num_experts:
        return set()
    return set(range(arch.num_layers)) - set(arch.dense_layers)


def chunk_layers(arch: ModelArch, pp: int, vpp: int, stage: int, chunk: int) -> range:
    """Global layer indices of one model chunk, as megatron offsets them (no uneven stages):
    chunk c of pipeline rank r holds L/(pp·vpp) layers from c·L/vpp + r·L/(pp·vpp)."""
    per_chunk = _div(arch.num_layers, pp * vpp, "layers / (pp x vpp)")
    start = chunk * (arch.num_layers // vpp) + stage * per_chunk
    return range(start, start + per_chunk)


def spec_of(arch: ModelArch):
    """The family's layer-spec facts (post-norms, zero-centred norms, TE fused attention)."""
    return get_family(arch.family).spec_options(arch)


def norms_per_layer(arch: ModelArch) -> int:
    return spec_of(arch).norms_per_layer


def param_counts(arch: ModelArch, tp: int = 1, pp: int = 1, vpp: int = 1, ep: int = 1, etp: int = 1) -> ParamCounts:
    """Per pipeline stage, per TP rank parameter counts as megatron allocates them (for an MoE
    model: the experts of one EP x ETP rank)."""
    if min(tp, pp, vpp, ep, etp) < 1:
        raise PlanError(f"tp={tp}, pp={pp}, vpp={vpp}, ep={ep}, etp={etp}: each must be >= 1")
    if vpp > 1 and pp < 2:
        raise PlanError(f"vpp={vpp} needs pp > 1")
    if ep * etp > 1 and not arch.num_experts:
        raise PlanError(f"ep={ep}, etp={etp}: expert parallelism needs a mixture-of-experts model")
    per_stage = _div(arch.num_layers, pp * vpp, "layers / (pp x vpp)") * vpp
    sharded, repl = layer_params(arch, tp)
    attn, _ = attention_params(arch, tp)
    moe = moe_layer_indices(arch)
    experts = expert_params(arch, ep, etp) if moe else 0
    moe_sharded = attn + (shared_expert_params(arch, tp) if moe else 0)  # attention + the shared expert
    router = arch.num_experts * arch.hidden_size
    vocab_shard = _div(arch.vocab_size, tp, "vocabulary / tp") * arch.hidden_size
    stages = []
    for r in range(pp):
        n_moe = sum(1 for c in range(vpp) for i in chunk_layers(arch, pp, vpp, r, c) if i in moe)
        st = StageParams(r, per_stage, (per_stage - n_moe) * sharded + n_moe * moe_sharded, per_stage * repl,
                         moe_layers=n_moe, experts=n_moe * experts, routers=n_moe * router)
        if r == 0:
            st.embedding = vocab_shard
        if r == pp - 1:
            st.final_norm = arch.hidden_size
            if not arch.tie_embeddings or pp > 1:
                st.output_layer = vocab_shard
                st.tied_copy = arch.tie_embeddings
        stages.append(st)
    per_layer = moe_sharded + repl + router + experts if moe else sharded + repl
    return ParamCounts(tp, pp, vpp, per_layer, stages, ep, etp)


@dataclass(frozen=True)
class ParamEntry:
    """One trainable tensor of a model chunk on one rank, in registration order."""

    numel: int
    shared: bool = False  # the tied embedding / output copies with pp > 1 (their own gradient bucket)
    expert: bool = False  # an expert weight (megatron: allreduce=False with ep > 1)
    router: bool = False  # a router weight (no gradient with moe.freeze_router)


def chunk_params(arch: ModelArch, tp: int, pp: int, vpp: int, stage: int, chunk: int, ep: int = 1,
                 etp: int = 1) -> list[ParamEntry]:
    """Every parameter of one model chunk on one rank, in megatron's registration order (GPTModel
    with this project's local layer spec): embedding, then per layer input norm, QKV (+ its bias,
    + the q/k norms), proj (+ Gemma-2's post-attention norm), pre-MLP norm, then either fc1, fc2
    (+ post-MLP norm) or, in an MoE layer, the router and each local expert's fc1 and fc2 (+ the
    shared expert's fc1 and fc2); then the final norm and the output layer. Latent attention
    (DeepSeek-V3) replaces QKV and proj by mla_tensors."""
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    a, g = arch.num_attention_heads, arch.num_key_value_heads
    post = spec_of(arch).post_norms
    qkv = [(a + 2 * g) * d // tp * h, *([(a + 2 * g) * d // tp] if arch.qkv_bias else []),
           *([d, d] if arch.qk_norm else [])]  # Qwen2's fused q/k/v bias; Qwen3's q and k norms
    attn = [ParamEntry(n) for n in [h, *qkv, h * (a * d // tp), *([h] if post else []), h]]
    if arch.kv_lora_rank:  # latent attention between the input and pre-MLP norms
        attn = [ParamEntry(h), *(ParamEntry(n) for n, _ in mla_tensors(arch, tp)), ParamEntry(h)]
    dense_mlp = [ParamEntry(n) for n in [2 * f // tp * h, h * (f // tp), *([h] if post else [])]]
    moe_mlp = []
    if arch.num_experts:
        width = arch.moe_intermediate_size // etp
        moe_mlp = [ParamEntry(arch.num_experts * h, router=True)]
        moe_mlp += [ParamEntry(n, expert=True) for _ in range(arch.num_experts // ep) for n in (2 * width * h, h * width)]
        shared_width = arch.shared_expert_intermediate_size // tp  # DeepSeek-V3 (registered after the experts)
        moe_mlp += [ParamEntry(n) for n in (2 * shared_width * h, h * shared_width)] if shared_width else []
    moe = moe_layer_indices(arch)
    shared = arch.tie_embeddings and pp > 1
    vocab_shard = arch.vocab_size // tp * h
    first, last = stage == 0 and chunk == 0, stage == pp - 1 and chunk == vpp - 1
    out = [ParamEntry(vocab_shard, shared)] if first else []
    for i in chunk_layers(arch, pp, vpp, stage, chunk):
        out += attn + (moe_mlp if i in moe else dense_mlp)
    if last:
        out.append(ParamEntry(h))
        if not arch.tie_embeddings or pp > 1:
            out.append(ParamEntry(vocab_shard, shared))
    return out


def chunk_param_numels(arch: ModelArch, tp: int, pp: int, vpp: int, stage: int, chunk: int, ep: int = 1,
                       etp: int = 1) -> list[tuple[int, bool]]:
    """(numel, shared_embedding) of each parameter of one model chunk on one rank, in registration
    order (see chunk_params)."""
    return [(p.numel, p.shared) for p in chunk_params(arch, tp, pp, vpp, stage, chunk, ep, etp)]


def buffer_numels(params: list[ParamEntry], ep: int, freeze_router: bool = False) -> tuple[list, list]:
    """The chunk's trainable parameters split as megatron's DDP splits them into gradient buffers:
    (dense, expert), each [(numel, shared)] in registration order. Expert weights have their own
    buffer, reduced and sharded over the expert data-parallel group, only when ep > 1 (megatron
    marks them allreduce=False only then); frozen routers get no buffer."""
    dense, expert = [], []
    for p in params:
        if p.router and freeze_router:
            continue
        (expert if p.expert and ep > 1 else dense).append((p.numel, p.shared))
    return dense, expert


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def dp_shard_numels(params: list[tuple[int, bool]], dp: int, bucket_size: Optional[int] = None) -> list[int]:
    """Parameter elements in each data-parallel rank's shard of one chunk's gradient buffer, as
    megatron lays it out for the distributed optimizer: parameters in reverse order, each start
    padded to 64 elements, buckets of `bucket_size` elements (None: one bucket; the shared
    embedding alone in its own), each bucket padded to a multiple of lcm(dp, 128) and split
    evenly over the dp ranks. The optimizer holds fp32 main weights and moments for exactly
    these elements."""
    divisor = math.lcm(dp, 128)
    buckets = []  # (start, padded end, [(param start, param end), ...])
    start = bucket_start = end = 0
    ranges: list[tuple[int, int]] = []

    def close(at: int) -> int:
        nonlocal bucket_start, ranges
        stop = _pad(at, divisor)
        buckets.append((bucket_start, stop, ranges))
        bucket_start, ranges = stop, []
        return stop

    for numel, shared in reversed(params):
        start = _pad(start, 64)
        if shared and ranges:
            start = close(start)
        end = start + numel
        ranges.append((start, end))
        start = close(end) if shared or (bucket_size is not None and end - bucket_start >= bucket_size) else end
    if ranges:
        close(end)
    per_rank = [0] * dp
    for b0, b1, members in buckets:
        shard = (b1 - b0) // dp
        for ps, pe in members:  # the ranks whose shard [b0 + r*shard, b0 + (r+1)*shard) meets the param
            first, last = (ps - b0) // shard, (pe - 1 - b0) // shard
            if first == last:  # inside one rank's shard (most parameters)
                per_rank[first] += pe - ps
                continue
            per_rank[first] += b0 + (first + 1) * shard - ps  # the param's head, its tail, full shards between
            per_rank[last] += pe - (b0 + last * shard)
            for r in range(first + 1, last):
                per_rank[r] += shard
    return per_rank


_SHARDS: dict = {}


def optimizer_shards(arch: ModelArch, layout: Layout, stage: int, bucket_size: Optional[int],
                     freeze_router: bool = False) -> tuple[list[int], list[int]]:
    """(elements per DP rank of the dense buffers, elements per expert-DP rank of the expert
    buffers) over all model chunks of one pipeline stage: what the distributed optimizer shards.
    Cached: the plan asks for the same layout under several recompute and reference modes."""
    key = (repr(arch), layout.tp, layout.pp, layout.vpp, layout.dp, layout.ep, layout.etp, stage, bucket_size,
           freeze_router)
    if key not in _SHARDS:
        dense_shards, expert_shards = [0] * layout.dp, [0] * layout.edp
        for chunk in range(layout.vpp):
            entries = chunk_params(arch, layout.tp, layout.pp, layout.vpp, stage, chunk, layout.ep, layout.etp)
            dense, expert = buffer_numels(entries, layout.ep, freeze_router)
            for r, n in enumerate(dp_shard_numels(dense, layout.dp, bucket_size) if dense else []):
                dense_shards[r] += n
            for r, n in enumerate(dp_shard_numels(expert, layout.edp, bucket_size) if expert else []):
                expert_shards[r] += n
        if len(_SHARDS) > 4096:
            _SHARDS.clear()
        _SHARDS[key] = (dense_shards, expert_shards)
    dense_shards, expert_shards = _SHARDS[key]
    return list(dense_shards), list(expert_shards)


def ddp_bucket_size(dp: int, overlap_grad_reduce: bool) -> Optional[int]:
    """megatron DDP's default bucket size (elements); one bucket when grad reduce is not overlapped."""
    return max(40_000_000, 1_000_000 * dp) if overlap_grad_reduce else None


def compute_params(arch: ModelArch) -> int:
    """N for the FLOPs count: all parameters a token uses but the input embedding (the output GEMM
    counted once); for a mixture of experts the active ones: the router and top-k experts."""
    emb = arch.vocab_size * arch.hidden_size
    return num_params(arch, active=True) - emb + (emb if arch.tie_embeddings else 0)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def uses_flash_attention(arch: ModelArch, backend: str = "te") -> bool:
    """A fused attention kernel that keeps only its output and an fp32 log-sum-exp: Transformer
    Engine's, or, on the local backend, torch's scaled_dot_product_attention run per sequence.
    Logit soft-capping (Gemma-2) and attention sinks (gpt-oss) have no fused kernel: their attention
    is computed unfused, per sequence, on every backend."""
    if backend == "te" and not spec_of(arch).mla:  # latent attention runs the local spec on every backend
        return spec_of(arch).te_fused_attention
    return not (arch.attn_logit_softcapping or spec_of(arch).attention_sinks)


def uses_fused_norms(arch: ModelArch, backend: str = "te") -> bool:
    """Transformer Engine's LayerNormLinear (norm fused into the next GEMM); Gemma-2 keeps this
    repo's local norms on every backend."""
    return backend == "te" and spec_of(arch).te_fused_attention


def _norm_bytes(arch: ModelArch, e: int, fused: bool) -> int:
    """Bytes per hidden element a norm keeps for its backward (its input, plus local fp32 copies)."""
    if fused:
        return e
    fp32_input = 4
    normed = 4 if spec_of(arch).zero_centered_norm else e  # (1 + w) in fp32 vs w · normed.to(dtype)
    return fp32_input + normed


def moe_bytes_per_token(arch: ModelArch, dtype: str = "bf16", etp: int = 1) -> float:
    """Bytes one MoE layer keeps for the backward per token entering it on a rank (megatron's
    alltoall dispatcher, no token dropping, balanced routing: the rank's experts process k·etp
    rows per token; its router input is the layer's second GEMM input, counted with the norms):
        router     k·(8 + 4)         the top-k indices (int64) and the fp32 softmax over the top-k
        permute    E·(1 + e) + 8·k   the [E, tokens] routing mask and probabilities masked_select
                                     keeps, and the permutation index (also the un-permute's)
        experts    k·etp·e·(h + 1)   the dispatched rows (fc1 input, gathered over etp) and their
                                     routing probability
                   + 6·e·k·I         per row of width I/etp: fc1 output (2), act(gate), up copy,
                                     the gated product (kept by the probability scaling) and the
                                     scaled product (fc2 input)
    (Measured with saved_tensors_hooks on the local backend: these are all the MoE layer keeps.)"""
    e = DTYPE_BYTES[dtype]
    k, h = arch.num_experts_per_tok, arch.hidden_size
    router = k * (8 + 4)
    permute = arch.num_experts * (1 + e) + 8 * k
    experts = k * etp * e * (h + 1) + 6 * e * k * arch.moe_intermediate_size
    return router + permute + experts


def mla_bytes_per_token(arch: ModelArch, e: int, fused_norms: bool = False) -> tuple[int, int]:
    """(replicated, TP-sharded) bytes DeepSeek-V3's latent attention keeps per token for the
    backward, besides the layer input norm and its output (counted as for any layer):
        replicated  (q_lora + kv_lora)·(norm + e)   each latent norm's input (fp32) and normalised
                                                    copy, and the latent as the up projection's input
                                                    (/t with SP: megatron scatters the gathered latent)
        sharded     e·a·(2·(nope + rope) + 2·v)     q and k after RoPE (the shared RoPE key expanded
                                                    over the heads), v, and the attention output
    The RoPE halves keep only the cos/sin tables (left out, as for standard attention)."""
    latent = (arch.q_lora_rank + arch.kv_lora_rank) * (_norm_bytes(arch, e, fused_norms) + e)
    a, qk = arch.num_attention_heads, arch.qk_nope_head_dim + arch.qk_rope_head_dim
    return latent, e * a * (2 * qk + 2 * arch.v_head_dim)


def layer_activation_bytes(arch: ModelArch, seq_length: int, rows: int = 1, tp: int = 1, sp: bool = False,
                           recompute: str = "none", dtype: str = "bf16", backend: str = "te",
                           moe: Optional[bool] = None, etp: int = 1, pairs_per_row: int = 1) -> float:
    """Activation bytes one transformer layer keeps for the backward of one micro-batch
    (recompute none/selective), or, for recompute=full, the checkpointed layer input only.
    moe: the layer has a mixture-of-experts MLP (None: whenever the model has experts)."""
    e = DTYPE_BYTES[dtype]
    h, f, a = arch.hidden_size, arch.intermediate_size, arch.num_attention_heads
    hq, hkv = a * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    s, b, t = seq_length, rows, tp
    s_seq = s / (2 * pairs_per_row)  # attention runs per sequence: a pair is two sequences
    rep_div = t if sp else 1
    moe = bool(arch.num_experts) if moe is None else moe
    if recompute == "full":
        return s * b * e * h / rep_div
    flash = uses_flash_attention(arch, backend)
    fused_norms = uses_fused_norms(arch, backend)
    n_norm = norms_per_layer(arch)
    replicated = n_norm * _norm_bytes(arch, e, fused_norms) * h + 2 * e * h  # QKV input, fc1 (or router) input
    sharded = e * (2 * hq + 2 * hkv)
    if arch.kv_lora_rank:  # latent attention: see mla_bytes_per_token
        latent, sharded = mla_bytes_per_token(arch, e, fused_norms)
        replicated += latent
    if not moe:
        sharded += e * 5 * f
    elif arch.shared_expert_intermediate_size:  # DeepSeek-V3's shared expert keeps what a dense MLP keeps
        sharded += e * 5 * arch.shared_expert_intermediate_size
    if arch.qk_norm:  # Qwen3: the per-head q/k norms keep what the hidden-size norms keep, per q/k feature
        sharded += (hq + hkv) * _norm_bytes(arch, e, fused_norms)
    if flash:
        sharded += 4 * a  # fp32 log-sum-exp per head and token
    elif recompute != "selective":
        softcap = 4 if arch.attn_logit_softcapping else 0
        sharded += 4 * hq * 2 + e * hq - e * (hq + 2 * hkv)  # fp32 q, k and repeated v replace q, k, v
        sharded += s_seq * a * (4 + e + softcap)  # scores over the token's own sequence
    per_token = replicated / rep_div + sharded / t
    if moe:  # the tokens of the rank's sequence shard enter the MoE layer (SP is on whenever t > 1)
        per_token += moe_bytes_per_token(arch, dtype, etp) / rep_div
    extra = 0.0
    if not flash and recompute != "selective":
        extra = s_seq * s * b  # the boolean [L, L] mask of each sequence, kept by masked_fill (not per head)
    return s * b * per_token + extra


# ---------------------------------------------------------------------------------------------
# Memory per GPU
# ---------------------------------------------------------------------------------------------


@dataclass
class StageMemory:
    stage: int
    params: int
    weights: float
    grads: float
    optimizer: float
    optimizer_distributed: float  # the largest over data-parallel ranks
    optimizer_plain: float
    activations: float  # with the chosen recomputation
    activations_by_recompute: dict
    in_flight: float  # micro-batches' worth of the stage's layers held at once
    logits: float  # last stage: logits + final norm/output-layer inputs
    reference_by_mode: dict  # extra bytes of the reference in each mode (training phase)
    reference_phase: float  # peak while precomputing with a separate reference model
    overhead: float
    training_total: float
    total: float  # peak over the reference precompute and training phases
    optimizer_by_dp_rank: list = field(default_factory=list)  # distributed optimizer, per DP rank (max over TP)
    optimizer_by_rank: list = field(default_factory=list)  # per rank of the stage, j = tp_rank + tp·dp_rank
    expert_weights: float = 0.0  # of `weights`, the rank's expert weights


@dataclass
class MemoryEstimate:
    layout: Layout
    dtype: str
    seq_length: int
    recompute: str
    distributed_optimizer: bool
    reference_mode: str
    num_microbatches: int
    stages: list[StageMemory]

    @property
    def binding(self) -> StageMemory:
        return max(self.stages, key=lambda s: (s.total, -s.stage))

    @property
    def total(self) -> float:
        return self.binding.total

    # The binding stage's components.
    @property
    def weights(self) -> float:
        return self.binding.weights

    @property
    def grads(self) -> float:
        return self.binding.grads

    @property
    def optimizer(self) -> float:
        return self.binding.optimizer

    @property
    def activations(self) -> float:
        return self.binding.activations

    @property
    def logits(self) -> float:
        return max(s.logits for s in self.stages)


def in_flight_passes(pp: int, vpp: int, stage: int, num_microbatches: int) -> float:
    """Micro-batches' worth of the stage's layers whose activations are held at the peak."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - stage, num_microbatches))
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, num_microbatches * vpp)
    return chunks / vpp


def microbatches(global_batch_pairs: int, dp: int, pairs_per_row: int = 1, pp: int = 1, vpp: int = 1) -> int:
    """Rows each data-parallel rank runs per step (padded to a multiple of pp for interleaving)."""
    m = math.ceil(global_batch_pairs / (dp * pairs_per_row))
    if vpp > 1:
        m = math.ceil(m / pp) * pp
    return max(m, 1)


def memory_per_gpu(arch: ModelArch, layout: Layout, dtype: str = "bf16", seq_length: int = 2560,
                   micro_batch_rows: int = 1, recompute: str = "none", distributed_optimizer: bool = True,
                   reference_mode: str = "initial", num_microbatches_in_flight: Optional[float] = None,
                   num_microbatches: Optional[int] = None, backend: str = "te",
                   overlap_grad_reduce: bool = True, freeze_router: bool = False,
                   pairs_per_row: int = 1) -> MemoryEstimate:
    """Bytes per GPU on every pipeline stage; `.binding` is the stage with the highest peak.

    num_microbatches: rows per DP rank per step (bounds the 1F1B warm-up); default pp (so the
    first stage holds pp micro-batches). num_microbatches_in_flight: override the schedule's
    count (every stage then holds that many micro-batches of its layers). overlap_grad_reduce:
    megatron's gradient buckets (on with CUDA, as the trainer runs; they move the DP shard
    boundaries of the distributed optimizer by a few elements; megatron buckets only the first
    pipeline stage). freeze_router: moe.freeze_router (routers get no gradient, no optimizer state)."""
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    if recompute not in RECOMPUTE:
        raise PlanError(f"recompute {recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    if reference_mode not in REFERENCE_MODES:
        raise PlanError(f"reference mode {reference_mode!r}: choose one of {', '.join(REFERENCE_MODES)}")
    e = DTYPE_BYTES[dtype]
    t, pp, vpp, dp, ep, etp = layout.tp, layout.pp, layout.vpp, layout.dp, layout.ep, layout.etp
    counts = param_counts(arch, t, pp, vpp, ep, etp)
    m = num_microbatches if num_microbatches is not None else pp
    s, b, h = seq_length, micro_batch_rows, arch.hidden_size
    rep_div = t if layout.sp else 1
    act = {kind: {rc: layer_activation_bytes(arch, s, b, t, layout.sp, rc, dtype, backend, kind == "moe", etp,
                                             pairs_per_row) for rc in RECOMPUTE} for kind in ("dense", "moe")}
    opt_bytes = 12 if dtype == "bf16" else 8  # fp32 master + two moments, or two moments
    stages = []
    for st in counts.stages:
        p = st.total
        trainable = p - (st.routers if freeze_router else 0)
        weights, grads = e * p, 4.0 * trainable
        opt_plain = float(opt_bytes * trainable)
        bucket = ddp_bucket_size(dp, overlap_grad_reduce) if st.stage == 0 else None
        dense_shards, expert_shards = optimizer_shards(arch, layout, st.stage, bucket, freeze_router)
        # Rank j of the stage (j = tp_rank + tp·dp_rank) is expert-DP rank j // (etp·ep): megatron
        # orders both meshes tp (or etp), [ep], dp, with pp outermost.
        opt_by_rank = [float(opt_bytes * (dense_shards[j // t] + expert_shards[j // (etp * ep)]))
                       for j in range(t * dp)]
        opt_by_dp = [max(opt_by_rank[d * t:(d + 1) * t]) for d in range(dp)]
        opt_dist = max(opt_by_rank)
        flight = num_microbatches_in_flight if num_microbatches_in_flight is not None else \
            in_flight_passes(pp, vpp, st.stage, m)
        pipe_out = (flight * vpp if vpp > 1 else flight) * e * s * b * h / rep_div if pp > 1 else 0.0
        kinds = [(n, act[kind]) for n, kind in ((st.dense_layers, "dense"), (st.moe_layers, "moe")) if n]
        acts = {}
        for rc in RECOMPUTE:
            acts[rc] = sum(flight * n * a[rc] for n, a in kinds) + pipe_out
            if rc == "full":
                acts[rc] += max(a["none"] for _, a in kinds)  # one layer recomputed at a time during the backward
        logits = 0.0
        if st.stage == pp - 1:
            final_norm_in = _norm_bytes(arch, e, False) * h  # the final norm is always the local one
            logits = s * b * ((final_norm_in + e * h) / rep_div + (4 + e) * arch.vocab_size / t)
        ref_w = float(e * p)
        ref_by_mode = {"none": 0.0, "initial": 0.0, "model": 0.0, "model-live": ref_w}
        optimizer = opt_dist if distributed_optimizer else opt_plain
        static = weights + grads + optimizer + RUNTIME_OVERHEAD
        training = static + acts[recompute] + logits + ref_by_mode[reference_mode]
        # Precompute with a separate reference: static state + its weights + a forward working set.
        fwd_ws = max(a["none"] for _, a in kinds) + (logits if st.stage == pp - 1 else 0.0)
        ref_phase = static + ref_w + fwd_ws
        total = max(training, ref_phase) if reference_mode == "model" else training
        stages.append(StageMemory(
            st.stage, p, weights, grads, optimizer, opt_dist, opt_plain, acts[recompute], acts, flight, logits,
            ref_by_mode, ref_phase, float(RUNTIME_OVERHEAD), training, total, opt_by_dp, opt_by_rank,
            st.experts * e))
    return MemoryEstimate(layout, dtype, seq_length, recompute, distributed_optimizer, reference_mode, m, stages)


# ---------------------------------------------------------------------------------------------
# Sampling stage (vLLM)
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingMemory:
    tp: int
    weights: float
    kv_bytes_per_token: float
    kv_tokens: int
    full_sequences: int  # KV for this many sequences of seq_length tokens at once
    utilization: float


def sampling_memory(arch: ModelArch, gpu: str | GPUSpec, tp_vllm: int, seq_length: int = 2560,
                    utilization: float = 0.9) -> SamplingMemory:
    g = get_gpu(gpu)
    # vLLM shards each expert over its TP ranks like a dense MLP (no expert parallelism by default).
    weights = 2.0 * param_counts(arch, tp_vllm, 1, etp=tp_vllm if arch.num_experts else 1).max_per_rank
    kv_heads = math.ceil(arch.num_key_value_heads / tp_vllm)
    per_token = 2.0 * arch.num_layers * kv_heads * arch.head_dim * 2
    if arch.kv_lora_rank:  # latent attention: vLLM caches the latent and the RoPE key, whole on every TP rank
        per_token = 2.0 * arch.num_layers * (arch.kv_lora_rank + arch.qk_rope_head_dim)
    free = utilization * g.memory_bytes - weights - VLLM_OVERHEAD
    tokens = max(0, int(free // per_token))
    return SamplingMemory(tp_vllm, weights, per_token, tokens, tokens // seq_length, utilization)


def vllm_tp_options(arch: ModelArch, gpus_per_node: int = 8) -> list[int]:
    return [t for t in range(1, gpus_per_node + 1)
            if gpus_per_node % t == 0 and arch.num_attention_heads % t == 0 and arch.vocab_size % t == 0
            and (not arch.num_experts or arch.moe_intermediate_size % t == 0)
            and arch.shared_expert_intermediate_size % t == 0]


def choose_vllm_tp(arch: ModelArch, gpu: str | GPUSpec, gpus_per_node: int = 8, seq_length: int = 2560,
                   min_sequences: int = 64) -> SamplingMemory:
    """The smallest vLLM TP whose KV cache holds `min_sequences` full-length sequences at once
    (else the largest TP in a node)."""
    options = [sampling_memory(arch, gpu, t, seq_length) for t in vllm_tp_options(arch, gpus_per_node)]
    for opt in options:
        if opt.full_sequences >= min_sequences:
            return opt
    return options[-1]


@dataclass(frozen=True)
class SamplingSettings:
    """What one round's sampling asks of an engine: `n` samples per prompt for `prompts_per_engine`
    prompts in flight, each up to `seq_length` tokens (sampling.max_model_len, or the prompt limit
    plus sampling.max_tokens), in `utilization` of each GPU's memory (gpu_memory_utilization)."""

    n: int = 5
    prompts_per_engine: int = 32
    seq_length: int = 2560
    utilization: float = 0.9
    max_nodes_per_engine: int = 8

    @property
    def sequences(self) -> int:
        return self.n * self.prompts_per_engine


@dataclass
class EngineOption:
    """One vLLM engine layout with its memory per GPU (bytes) for the sampling batch."""

    tp: int
    pp: int
    dp: int
    ep: int  # expert parallel size (dp x tp) for an MoE policy; 1: experts split over TP like a dense MLP
    gpus: int
    nodes_per_engine: int
    weights: float
    kv_bytes_per_token: float
    sequences_per_gpu: int  # the batch's sequences whose KV one GPU holds (a DP rank holds its share)
    kv_needed: float
    kv_capacity_sequences: int  # full-length sequences the free memory holds per GPU
    budget: float  # utilization x GPU memory
    fits: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("weights", "kv_needed", "budget"):
            d[k + "_gib"] = round(d.pop(k) / GiB, 2)
        return d

    def short(self) -> str:
        parts = [f"TP {self.tp}"] + [f"{k} {v}" for k, v in (("PP", self.pp), ("DP", self.dp)) if v > 1]
        return " x ".join(parts) + (f", EP {self.ep}" if self.ep > 1 else "")


def engine_kv_bytes_per_token(arch: ModelArch, tp: int, pp: int = 1) -> float:
    """KV cache bytes per token on one GPU of an engine (bf16): the key/value heads of its TP rank
    (at least one: vLLM replicates them when TP exceeds them) over its pipeline stage's layers; a
    latent-attention model caches the latent and the RoPE key whole on every TP rank."""
    layers = arch.num_layers / pp
    if arch.kv_lora_rank:
        return 2.0 * layers * (arch.kv_lora_rank + arch.qk_rope_head_dim)
    return 2.0 * layers * math.ceil(arch.num_key_value_heads / tp) * arch.head_dim * 2


def engine_option(arch: ModelArch, gpu: str | GPUSpec, gpus_per_node: int, ss: SamplingSettings, tp: int,
                  pp: int = 1, dp: int = 1) -> EngineOption:
    """An engine of tp x pp x dp GPUs. Dense: weights split over TP x PP, every GPU holds its heads'
    KV of the whole batch. MoE (dp x tp > 1): attention and dense layers split over TP and copied
    per DP rank, experts split over EP = dp x tp; each DP rank holds the KV of its share."""
    g = get_gpu(gpu)
    moe = bool(arch.num_experts)
    ep = dp * tp if moe else 1
    counts = param_counts(arch, tp, pp, ep=ep, etp=1) if moe else param_counts(arch, tp, pp)
    weights = 2.0 * counts.max_per_rank
    per_token = engine_kv_bytes_per_token(arch, tp, pp)
    per_gpu = math.ceil(ss.sequences / dp)
    kv_needed = per_gpu * ss.seq_length * per_token
    budget = ss.utilization * g.memory_bytes
    free = budget - weights - VLLM_OVERHEAD
    capacity = max(0, int(free // (per_token * ss.seq_length)))
    gpus = tp * pp * dp
    return EngineOption(tp, pp, dp, ep, gpus, max(1, math.ceil(gpus / gpus_per_node)), weights, per_token, per_gpu,
                        kv_needed, capacity, budget, free >= kv_needed)


def engine_tp_ok(arch: ModelArch, tp: int) -> bool:
    """vLLM's TP limits: TP divides the attention heads and the vocabulary, and divides the
    key/value heads or is a multiple of them (then they are replicated)."""
    kv = arch.num_key_value_heads or arch.num_attention_heads
    return (arch.num_attention_heads % tp == 0 and arch.vocab_size % tp == 0
            and (tp % kv == 0 if tp >= kv else kv % tp == 0))


def engine_options(arch: ModelArch, gpu: str | GPUSpec, gpus_per_node: int = 8,
                   ss: SamplingSettings = SamplingSettings()) -> list[EngineOption]:
    """Candidate engines, smallest first. Up to a node: TP (dense), or TP x DP with EP = DP x TP
    (MoE, the most DP first). Wider: whole nodes, TP = gpus_per_node x PP across nodes (dense), or
    DP x EP across nodes (MoE; EP must divide the experts)."""
    tps = [t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0 and engine_tp_ok(arch, t)]
    sizes = list(tps) + [gpus_per_node * k for k in range(2, ss.max_nodes_per_engine + 1)]
    out = []
    for size in sizes:
        if arch.num_experts:
            for t in (t for t in tps if size % t == 0 and t <= size):
                if arch.num_experts % size == 0:
                    out.append(engine_option(arch, gpu, gpus_per_node, ss, t, 1, size // t))
        elif size <= gpus_per_node:
            out.append(engine_option(arch, gpu, gpus_per_node, ss, size))
        elif tps and tps[-1] == gpus_per_node and arch.num_layers % (size // gpus_per_node) == 0:
            out.append(engine_option(arch, gpu, gpus_per_node, ss, gpus_per_node, size // gpus_per_node))
    return out


def choose_engine(options: list[EngineOption]) -> Optional[EngineOption]:
    """The first (smallest) engine whose weights and the batch's KV cache fit; None when none does."""
    return next((o for o in options if o.fits), None)


def format_sampling(arch: ModelArch, gpu: str | GPUSpec, gpus_per_node: int, ss: SamplingSettings,
                    recipe: Optional[EngineOption] = None) -> str:
    """The sampling section of `aipo-mp plan`: each candidate engine's memory per GPU, the chosen
    one, and the recipe's own layout when a recipe was given."""
    options = engine_options(arch, gpu, gpus_per_node, ss)
    chosen = choose_engine(options)
    lines = [f"sampling (vLLM, bf16, {ss.utilization:.0%} of GPU memory, batch {ss.n} x {ss.prompts_per_engine} "
             f"prompts per engine = {ss.sequences} sequences of {ss.seq_length} tokens): GiB per GPU",
             "  engine                 gpus nodes | weights | KV/token KiB | KV batch | holds seqs | fits"]
    shown = [o for o in options if chosen is None or o.gpus <= chosen.gpus]  # up to the chosen size
    for o in shown + ([recipe] if recipe is not None else []):
        mark = "  <- recipe" if o is recipe else ("  <- chosen (smallest that fits)" if o is chosen else "")
        lines.append(f"  {o.short():<22} {o.gpus:>4} {o.nodes_per_engine:>5} | {_g(o.weights):>7} | "
                     f"{o.kv_bytes_per_token / 1024:>12.1f} | {_g(o.kv_needed):>8} | {o.kv_capacity_sequences:>10,} | "
                     f"{'yes' if o.fits else 'no':>4}{mark}")
    if chosen is None:
        lines.append(f"  no engine of up to {ss.max_nodes_per_engine} nodes holds the weights and the batch's KV cache")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------


@dataclass
class StepTime:
    tokens: int  # tokens the policy trains on per step
    flops_per_token_forward: float
    model_flops: float  # per step, whole cluster: policy 3F + reference F (amortised)
    hardware_flops: float  # + recomputation + pipeline padding rows
    num_microbatches: int
    compute_s: float
    bubble_fraction: float
    bubble_s: float
    dp_comm_s: float
    reference_s: float  # part of total_s: the amortised reference forward
    total_s: float
    mfu: float
    efficiency: float
    a2a_bytes: float = 0.0  # MoE token exchange one GPU sends per step (EP all-to-all + ETP gather/scatter)
    a2a_s: float = 0.0  # part of total_s (policy passes, in the pipeline, and the reference forward)


def attention_flops_per_token(arch: ModelArch, seq_length: int, pairs_per_row: int = 1) -> float:
    """Forward FLOPs of the score and value products per token: 2·L·a·(d_qk + d_v)·s_seq, i.e.
    4·L·hq·s_seq with one head size; latent attention: d_qk = nope + rope, d_v = v_head_dim."""
    s_seq = seq_length / (2 * pairs_per_row)
    if arch.kv_lora_rank:
        dims = arch.qk_nope_head_dim + arch.qk_rope_head_dim + arch.v_head_dim
    else:
        dims = 2 * arch.head_dim
    return 2.0 * arch.num_layers * arch.num_attention_heads * dims * s_seq


def forward_flops_per_token(arch: ModelArch, seq_length: int, pairs_per_row: int = 1) -> float:
    return 2.0 * compute_params(arch) + attention_flops_per_token(arch, seq_length, pairs_per_row)


def moe_exchange_bytes(arch: ModelArch, layout: Layout, seq_length: int, rows: int = 1,
                       dtype: str = "bf16") -> tuple[float, float]:
    """(EP all-to-all, ETP all-gather + reduce-scatter) bytes one GPU sends in ONE forward pass of
    one micro-batch through its pipeline stage's MoE layers (the most any stage has). Per MoE layer
    the rank's T = s·b/tp tokens (s·b without SP) go out as T·k rows of h values: dispatch sends
    the (ep − 1)/ep of them bound for other EP ranks and combine returns as many; with etp > 1
    the rows are all-gathered over the expert-TP group and the outputs reduce-scattered,
    (etp − 1)·T·k rows each way. The backward pass moves the same again (the gradients)."""
    if not arch.num_experts:
        return 0.0, 0.0
    e = DTYPE_BYTES[dtype]
    counts = param_counts(arch, layout.tp, layout.pp, layout.vpp, layout.ep, layout.etp)
    layers = max(s.moe_layers for s in counts.stages)
    tokens = seq_length * rows / (layout.tp if layout.sp else 1)
    row = arch.num_experts_per_tok * arch.hidden_size * e * tokens
    ep, etp = layout.ep, layout.etp
    return layers * 2 * row * (ep - 1) / ep, layers * 2 * row * (etp - 1)


def step_time(arch: ModelArch, layout: Layout, gpus: Optional[int] = None, gpu: str | GPUSpec = "h100-80gb",
              seq_length: int = 2560, global_batch_pairs: int = 32, recompute: str = "none",
              reference_forward: bool = True, efficiency: float = 0.40, pairs_per_row: int = 1,
              distributed_optimizer: bool = True, gpus_per_node: int = 8, dtype: str = "bf16",
              backend: str = "te") -> StepTime:
    """Estimated seconds per optimizer step (see the module docstring for the model)."""
    spec = get_gpu(gpu)
    if gpus is not None and gpus != layout.world:
        raise PlanError(f"{gpus} GPUs do not match {layout.short()} (= {layout.world} GPUs)")
    if not 0 < efficiency <= 1:
        raise PlanError(f"efficiency {efficiency}: must be in (0, 1]")
    n = layout.world
    e = DTYPE_BYTES[dtype]
    f_fwd = forward_flops_per_token(arch, seq_length, pairs_per_row)
    m_real = microbatches(global_batch_pairs, layout.dp, pairs_per_row)
    m = microbatches(global_batch_pairs, layout.dp, pairs_per_row, layout.pp, layout.vpp)
    tokens = layout.dp * m_real * seq_length
    hw_tokens = layout.dp * m * seq_length
    passes = 4.0 if recompute == "full" else 3.0
    policy_hw = passes * f_fwd * hw_tokens
    if recompute == "selective" and not uses_flash_attention(arch, backend):
        policy_hw += attention_flops_per_token(arch, seq_length, pairs_per_row) * hw_tokens
    ref_hw = f_fwd * tokens if reference_forward else 0.0
    rate = n * spec.peak_tflops * 1e12 * efficiency
    bubble = (layout.pp - 1) / (layout.vpp * m)
    compute = policy_hw / rate
    ref_s = ref_hw / rate  # one long forward-only pass over the round: no bubble to speak of
    # MoE token exchange (not overlapped with compute): forward + backward (+ recomputed forward)
    # per micro-batch, one forward per reference row. EP peers in the GPU's node go over NVLink.
    ep_fwd, etp_fwd = moe_exchange_bytes(arch, layout, seq_length, 1, dtype)
    in_node = min(layout.ep, max(gpus_per_node // layout.etp, 1))
    near = (in_node - 1) / (layout.ep - 1) if layout.ep > 1 else 1.0
    per_pass_s = (ep_fwd * near + etp_fwd) / (spec.intra_node_gbs * 1e9) + ep_fwd * (1 - near) / (spec.inter_node_gbs * 1e9)
    policy_passes = (passes - 1) * m  # forward + backward (+ recomputed forward); each moves one forward's volume
    ref_passes = m_real if reference_forward else 0
    a2a_policy, a2a_ref = policy_passes * per_pass_s, ref_passes * per_pass_s
    counts = param_counts(arch, layout.tp, layout.pp, layout.vpp, layout.ep, layout.etp)
    binding = counts.stages[counts.binding_stage]
    expert_p = binding.experts if layout.ep > 1 else 0  # with ep > 1 reduced over expert-DP only
    dense_p = binding.total - expert_p
    dp, edp = layout.dp, layout.edp
    per_param = (4 + e) if distributed_optimizer else 8
    volume = (dp - 1) / dp * dense_p * per_param + (edp - 1) / edp * expert_p * per_param
    bw = spec.intra_node_gbs if layout.tp * dp <= gpus_per_node else spec.inter_node_gbs
    dp_comm = volume / (bw * 1e9)
    total = (compute + a2a_policy) * (1 + bubble) + dp_comm + ref_s + a2a_ref
    model = 3.0 * f_fwd * tokens + (f_fwd * tokens if reference_forward else 0.0)
    mfu = model / (total * n * spec.peak_tflops * 1e12)
    return StepTime(tokens, f_fwd, model, policy_hw + ref_hw, m, compute, bubble, (compute + a2a_policy) * bubble,
                    dp_comm, ref_s, total, mfu, efficiency, (policy_passes + ref_passes) * (ep_fwd + etp_fwd),
                    a2a_policy * (1 + bubble) + a2a_ref)


# ---------------------------------------------------------------------------------------------
# Enumeration and ranking
# ---------------------------------------------------------------------------------------------


def enumerate_layouts(arch: ModelArch, gpus: int, gpus_per_node: int = 8, global_batch_pairs: int = 32,
                      seq_length: int = 2560, max_vpp: int = 4, etps: Sequence[int] = (1,)) -> list[Layout]:
    """Every valid (tp, pp, vpp, dp) for `gpus` GPUs: tp within a node dividing heads, KV heads and
    vocabulary; pp (x vpp) dividing the layers; dp = gpus / (tp·pp) dividing the global batch. For
    a mixture of experts also every ep dividing the experts and each etp of `etps` up to tp (etp = tp
    when ep = 1), where ep x etp divides the tp x dp ranks of a stage (expert-DP = tp·dp/(ep·etp))."""
    eps = divisors(arch.num_experts) if arch.num_experts else [1]
    out = []
    for tp in range(1, min(gpus_per_node, gpus) + 1):
        for pp in range(1, arch.num_layers + 1):
            if gpus % (tp * pp) or arch.num_layers % pp:
                continue
            dp = gpus // (tp * pp)
            vpps = [1] + [v for v in range(2, max_vpp + 1) if pp > 1 and arch.num_layers % (pp * v) == 0]
            for vpp in vpps:
                for ep in eps:
                    # Without EP the experts are split over the whole TP group (see layout_problems).
                    etp_choices = [1] if not arch.num_experts else [tp] if ep == 1 else sorted(set(etps))
                    for etp in etp_choices:
                        if etp > tp or (tp * dp) % (ep * etp):
                            continue
                        lay = Layout(tp, pp, vpp, dp, None, ep, etp)
                        if not layout_problems(arch, lay, gpus_per_node, global_batch_pairs, seq_length):
                            out.append(lay)
    return out


@dataclass
class PlanSettings:
    arch: ModelArch
    gpus: int
    gpu: GPUSpec
    seq_length: int = 2560
    global_batch_pairs: int = 32
    gpus_per_node: int = 8
    dtype: str = "bf16"
    reference_mode: str = "initial"
    distributed_optimizer: bool = True
    efficiency: float = 0.40
    headroom: float = 0.10
    pairs_per_row: int = 1
    model_name: str = ""
    backend: str = "te"
    freeze_router: bool = False
    etps: tuple = (1,)


@dataclass
class PlanRow:
    layout: Layout
    recompute: str
    memory: MemoryEstimate
    time: StepTime
    fits: bool
    headroom: float  # fraction of GPU memory left at the peak
    fits_model_reference: bool  # would still fit with reference.mode=model (precompute)
    model_reference_peak: float
    settings: PlanSettings = field(repr=False, default=None)

    @property
    def gpus_per_replica(self) -> int:
        return self.layout.tp * self.layout.pp


def evaluate(settings: PlanSettings, layout: Layout, recompute: str) -> PlanRow:
    st = settings
    m = microbatches(st.global_batch_pairs, layout.dp, st.pairs_per_row, layout.pp, layout.vpp)
    mem = memory_per_gpu(st.arch, layout, st.dtype, st.seq_length, 1, recompute, st.distributed_optimizer,
                         st.reference_mode, num_microbatches=m, backend=st.backend, freeze_router=st.freeze_router,
                         pairs_per_row=st.pairs_per_row)
    cap = st.gpu.memory_bytes
    head = 1 - mem.total / cap
    with_model = memory_per_gpu(st.arch, layout, st.dtype, st.seq_length, 1, recompute, st.distributed_optimizer,
                                "model", num_microbatches=m, backend=st.backend, freeze_router=st.freeze_router,
                                pairs_per_row=st.pairs_per_row).total
    t = step_time(st.arch, layout, None, st.gpu, st.seq_length, st.global_batch_pairs, recompute,
                  st.reference_mode != "none", st.efficiency, st.pairs_per_row, st.distributed_optimizer,
                  st.gpus_per_node, st.dtype, st.backend)
    return PlanRow(layout, recompute, mem, t, head >= st.headroom, head, 1 - with_model / cap >= st.headroom,
                   with_model, st)


def plan(arch: ModelArch, gpus: int, gpu: str | GPUSpec = "h100-80gb", seq_length: int = 2560,
         global_batch_pairs: int = 32, gpus_per_node: int = 8, dtype: str = "bf16",
         reference_mode: str = "initial", distributed_optimizer: bool = True, efficiency: float = 0.40,
         headroom: float = 0.10, recompute: str = "auto", max_vpp: int = 4, pairs_per_row: int = 1,
         model_name: str = "", backend: str = "te", etps: Sequence[int] = (1,),
         freeze_router: bool = False) -> list[PlanRow]:
    """Ranked rows, one per layout: fitting (>= headroom free) first, then by estimated step time,
    then fewer GPUs per model replica (tp·pp), smaller tp, vpp, ep, etp. recompute="auto" picks,
    per layout, the least recomputation that fits (full when nothing fits). etps: the expert
    tensor-parallel sizes to try (each up to tp) for a mixture of experts."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: must be >= 1")
    if backend not in ("te", "local"):
        raise PlanError(f"backend {backend!r}: choose te or local")
    if recompute != "auto" and recompute not in RECOMPUTE:
        raise PlanError(f"recompute {recompute!r}: choose auto or one of {', '.join(RECOMPUTE)}")
    if not etps or min(etps) < 1:
        raise PlanError(f"etp sizes {list(etps)}: each must be >= 1")
    settings = PlanSettings(arch, gpus, get_gpu(gpu), seq_length, global_batch_pairs, gpus_per_node, dtype,
                            reference_mode, distributed_optimizer, efficiency, headroom, pairs_per_row, model_name,
                            backend, freeze_router, tuple(etps))
    rows = []
    for lay in enumerate_layouts(arch, gpus, gpus_per_node, global_batch_pairs, seq_length, max_vpp, etps):
        if recompute != "auto":
            rows.append(evaluate(settings, lay, recompute))
            continue
        options = ["none", "full"] if uses_flash_attention(arch, backend) else ["none", "selective", "full"]
        tried = [evaluate(settings, lay, rc) for rc in options]
        fitting = [r for r in tried if r.fits]
        rows.append(fitting[0] if fitting else tried[-1])
    return rank_rows(rows)


def rank_rows(rows: list[PlanRow]) -> list[PlanRow]:
    return sorted(rows, key=lambda r: (not r.fits, r.time.total_s, r.gpus_per_replica, r.layout.tp,
                                       r.layout.vpp, r.layout.ep, r.layout.etp, RECOMPUTE.index(r.recompute)))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _g(x: float) -> str:
    return f"{x / GiB:.1f}"


def why(rows: list[PlanRow]) -> str:
    """A short explanation of the top choice."""
    if not rows:
        return "no valid layout"
    top = rows[0]
    st, lay, mem = top.settings, top.layout, top.memory
    moe = bool(st.arch.num_experts)

    def short(layout: Layout) -> str:
        return layout.short(moe)

    if not top.fits:
        least = min(rows, key=lambda r: r.memory.total)
        b = least.memory.binding
        static = b.weights + b.grads + b.optimizer + b.overhead
        cause = ("the weights, fp32 gradients and optimizer states alone take "
                 f"{_g(static)} GiB there: add GPUs" if static > (1 - st.headroom) * st.gpu.memory_bytes else
                 f"activations and logits take {_g(least.memory.total - static)} GiB there: add GPUs or lower "
                 "seq_length")
        return (f"nothing fits with {st.headroom:.0%} headroom on {st.gpus} x {st.gpu.name}; the smallest peak is "
                f"{short(least.layout)} recompute={least.recompute} at {_g(least.memory.total)} GiB of "
                f"{_g(st.gpu.memory_bytes)} GiB; {cause}")
    parts = [f"{short(lay)} recompute={top.recompute}: peak {_g(mem.total)} GiB/GPU on stage "
             f"{mem.binding.stage}, {top.headroom:.0%} headroom; est. {top.time.total_s:.2f} s/step "
             f"(bubble {top.time.bubble_fraction:.0%}, DP comm {top.time.dp_comm_s:.2f} s"
             + (f", all-to-all {top.time.a2a_s:.2f} s" if moe else "") + f"), MFU {top.time.mfu:.0%}"]
    fewer = [r for r in rows if r.gpus_per_replica < top.gpus_per_replica]
    fitting = [r for r in fewer if r.fits]
    if fitting:
        f = fitting[0]
        parts.append(f"{short(f.layout)} recompute={f.recompute} (fewer GPUs per replica) also fits but is slower "
                     f"({f.time.total_s:.1f} s: bubble {f.time.bubble_fraction:.0%}, DP comm {f.time.dp_comm_s:.2f} s)")
    elif fewer:
        f = min(fewer, key=lambda r: r.memory.total)
        parts.append(f"no layout with tp*pp < {top.gpus_per_replica} fits (closest: {short(f.layout)} "
                     f"recompute={f.recompute} at {_g(f.memory.total)} GiB)")
    runner = next((r for r in rows[1:] if r.fits), None)
    if runner and not (fitting and runner is fitting[0]):
        slower = runner.time.total_s / top.time.total_s - 1
        parts.append(f"next: {short(runner.layout)} recompute={runner.recompute} at {runner.time.total_s:.2f} s "
                     f"(+{slower:.1%}, peak {_g(runner.memory.total)} GiB)")
    if st.reference_mode in ("initial", "none"):
        ref = ("reference.mode=initial (no extra memory)" if st.reference_mode == "initial"
               else "no reference (objective without one)")
        extra = mem.binding.params * DTYPE_BYTES[st.dtype]
        ref += (f"; a separate reference model (+{_g(extra)} GiB during the precompute) "
                + ("also fits" if top.fits_model_reference else "would not fit"))
        parts.append(ref)
    else:
        parts.append(f"reference.mode={st.reference_mode} included in the peak")
    return "; ".join(parts)


COLUMNS = [
    ("#", 3), ("tp", 3), ("pp", 3), ("vpp", 3), ("dp", 4), ("recomp", 9), ("weights", 7), ("grads", 6),
    ("opt:dist", 8), ("opt:nodist", 10), ("act:none", 8), ("act:full", 8), ("logits", 6), ("ref:model", 9),
    ("peak", 6), ("fits", 4), ("head", 5), ("step_s", 7), ("MFU", 4),
]
# A mixture of experts adds the expert mesh after dp, the expert weights after weights, and the
# token all-to-all time before step_s.
MOE_COLUMNS = {"dp": [("ep", 3), ("etp", 3)], "weights": [("experts", 7)], "head": [("a2a_s", 6)]}


def columns(moe: bool) -> list[tuple[str, int]]:
    out = []
    for col in COLUMNS:
        out.append(col)
        out += MOE_COLUMNS.get(col[0], []) if moe else []
    return out


def format_plan(rows: list[PlanRow], top: int = 10, sampling: Optional[SamplingSettings] = None,
                recipe_engine: Optional[EngineOption] = None) -> str:
    """The ranked table (GiB per GPU on the binding pipeline stage), the sampling engine it would
    choose (format_sampling), the assumptions and a `why` line for the top choice."""
    if not rows:
        return "no valid layout\n"
    st = rows[0].settings
    arch = st.arch
    moe = bool(arch.num_experts)
    size = f"{num_params(arch) / 1e9:.1f}B params"
    if moe:
        size += f", {num_params(arch, active=True) / 1e9:.1f}B active"
    lines = [
        f"plan: {st.model_name or arch.family} ({size}) on {st.gpus} x {st.gpu.name} "
        f"({_g(st.gpu.memory_bytes)} GiB, {st.gpu.peak_tflops:.0f} TFLOP/s bf16), seq {st.seq_length}, "
        f"global batch {st.global_batch_pairs} pairs, {st.gpus_per_node} GPUs/node, {st.dtype}, "
        f"reference={st.reference_mode}, {'distributed' if st.distributed_optimizer else 'plain'} optimizer",
        f"memory in GiB per GPU on the binding pipeline stage; fits = peak <= {1 - st.headroom:.0%} of the GPU; "
        f"time at {st.efficiency:.0%} of peak + bubble + DP comm" + (" + all-to-all" if moe else "")
        + f"; {len(rows)} valid layouts",
    ]
    if moe:
        f_fwd = forward_flops_per_token(arch, st.seq_length, st.pairs_per_row)
        lines.append(
            f"mixture of experts: {arch.num_experts} experts, top-{arch.num_experts_per_tok}, "
            f"{arch.num_layers - len(arch.dense_layers)} MoE layers; FLOPs from the active parameters: "
            f"{f_fwd / 1e9:.1f} GFLOP/token forward; experts sharded over pp x ep x etp, their optimizer states "
            f"over expert-DP = tp*dp/(ep*etp)" + (", routers frozen" if st.freeze_router else ""))
    lines.append("")
    cols = columns(moe)
    header = " ".join(name.rjust(w) for name, w in cols)
    lines += [header, "-" * len(header)]
    for i, r in enumerate(rows[:top], 1):
        b = r.memory.binding
        vals = {"#": str(i), "tp": str(r.layout.tp), "pp": str(r.layout.pp), "vpp": str(r.layout.vpp),
                "dp": str(r.layout.dp), "ep": str(r.layout.ep), "etp": str(r.layout.etp), "recomp": r.recompute,
                "weights": _g(b.weights), "experts": _g(b.expert_weights), "grads": _g(b.grads),
                "opt:dist": _g(b.optimizer_distributed), "opt:nodist": _g(b.optimizer_plain),
                "act:none": _g(b.activations_by_recompute["none"]), "act:full": _g(b.activations_by_recompute["full"]),
                "logits": _g(max(s.logits for s in r.memory.stages)),
                "ref:model": "+" + _g(b.params * DTYPE_BYTES[st.dtype]), "peak": _g(r.memory.total),
                "fits": "yes" if r.fits else "no", "head": f"{r.headroom:.0%}", "a2a_s": f"{r.time.a2a_s:.2f}",
                "step_s": f"{r.time.total_s:.2f}", "MFU": f"{r.time.mfu:.0%}"}
        lines.append(" ".join(vals[name].rjust(w) for name, w in cols))
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more layouts (--top)")
    lines.append("columns: opt:dist/opt:nodist = fp32 master + Adam moments with/without the distributed optimizer; "
                 "act:none/act:full = activations without/with full recompute (micro-batches in flight included); "
                 "ref:model = extra bf16 weights of a separate reference model (reference.mode=model: only while "
                 "precomputing; initial: 0); peak = the chosen options + 2 GiB runtime; head = free fraction at the peak"
                 + ("; experts = the expert weights within weights; a2a_s = token all-to-all (EP) and expert-TP "
                    "gather/scatter seconds per step, within step_s" if moe else ""))
    lines.append("")
    lines.append(format_sampling(arch, st.gpu, st.gpus_per_node, sampling or SamplingSettings(), recipe_engine))
    lines.append("why: " + why(rows))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI: aipo-mp plan MODEL_CONFIG --gpus N --gpu NAME ...
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise PlanError(message)


def build_parser(prog: str = "aipo-mp plan") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Rank tensor/pipeline/data-parallel layouts by memory fit and estimated step time.")
    p.add_argument("model_config", help="YAML with model.arch (configs/models/*.yaml) or model.path, or an HF "
                   "model directory")
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    p.add_argument("--gpu", default="h100-80gb", help=f"one of {', '.join(GPUS)}")
    p.add_argument("--seq-length", type=int, default=2560, help="tokens per packed row (one pair)")
    p.add_argument("--global-batch-pairs", type=int, default=32)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--reference-mode", default="initial", help=f"one of {', '.join(REFERENCE_MODES)}")
    p.add_argument("--recompute", default="auto", help="auto (least that fits), none, selective or full")
    p.add_argument("--efficiency", type=float, default=0.40, help="achievable fraction of bf16 peak (default 0.40)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer states not sharded over DP")
    p.add_argument("--etp", default="1", help="mixture of experts: expert tensor-parallel sizes to try, comma-separated "
                   "(default 1; each up to tp); ep is enumerated over the divisors of the expert count")
    p.add_argument("--freeze-router", action="store_true", help="moe.freeze_router: routers without gradient or "
                   "optimizer state")
    p.add_argument("--prompts-per-engine", type=int, default=32, help="sampling: prompts one vLLM engine holds at "
                   "once; with sampling.n of the config they size the KV cache (default 32)")
    p.add_argument("--json", action="store_true", help="one JSON object: the training rows and the sampling engines")
    return p


def sampling_settings(cfg, prompts_per_engine: int) -> SamplingSettings:
    """The sampling batch of a config: sampling.n x prompts per engine, each of sampling.max_model_len
    tokens (else the prompt limit plus sampling.max_tokens), in gpu_memory_utilization."""
    s = cfg.sampling
    length = s.max_model_len or cfg.data.max_prompt_length + s.max_tokens
    return SamplingSettings(s.n, prompts_per_engine, length, s.gpu_memory_utilization)


def recipe_engine(cfg, arch: ModelArch, gpu: str, gpus_per_node: int, ss: SamplingSettings) -> Optional[EngineOption]:
    """The engine a recipe (a config naming rounds.prompts) asks for, sized like the candidates;
    None for a model config, or a layout the planner cannot split (validation names why)."""
    if not cfg.rounds.prompts:
        return None
    s = cfg.sampling
    try:
        return engine_option(arch, gpu, gpus_per_node, ss, s.tensor_parallel, s.pipeline_parallel, s.data_parallel)
    except PlanError:
        return None


def plan_json(rows: list[PlanRow], top: int, arch: ModelArch, gpu: str, gpus_per_node: int, ss: SamplingSettings,
              recipe: Optional[EngineOption]) -> dict:
    """The numbers of the text plan as one JSON object (GiB per GPU)."""
    training = [{"tp": r.layout.tp, "pp": r.layout.pp, "vpp": r.layout.vpp, "dp": r.layout.dp, "ep": r.layout.ep,
                 "etp": r.layout.etp, "recompute": r.recompute, "peak_gib": round(r.memory.total / GiB, 2),
                 "fits": r.fits, "headroom": round(r.headroom, 3), "step_s": round(r.time.total_s, 3)}
                for r in rows[:top]]
    options = engine_options(arch, gpu, gpus_per_node, ss)
    chosen = choose_engine(options)
    return {"gpus": rows[0].settings.gpus if rows else None, "gpu": get_gpu(gpu).name, "gpus_per_node": gpus_per_node,
            "training": training,
            "sampling": {"settings": asdict(ss), "sequences": ss.sequences,
                         "chosen": chosen.to_dict() if chosen else None, "options": [o.to_dict() for o in options],
                         "recipe": recipe.to_dict() if recipe else None}}


def parse_sizes(text: str, flag: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise PlanError(f"{flag}={text}: give positive integers separated by commas, e.g. 1,2")
    return sizes


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aipo_mp.config import load_config
    from aipo_mp.validate import resolve_arch

    for name in ("gpus", "seq_length", "global_batch_pairs", "gpus_per_node", "top"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.seq_length % 2:
        raise PlanError(f"--seq-length={args.seq_length}: must be even (a pair is two sequences in one row)")
    if args.reference_mode not in REFERENCE_MODES:
        raise PlanError(f"--reference-mode={args.reference_mode}: choose one of {', '.join(REFERENCE_MODES)}")
    get_gpu(args.gpu)
    etps = parse_sizes(args.etp, "--etp")
    if args.prompts_per_engine < 1:
        raise PlanError(f"--prompts-per-engine={args.prompts_per_engine}: must be >= 1")
    source = Path(args.model_config)
    if source.is_dir():  # an HF directory (config.json) or an aipo_mp checkpoint
        from aipo_mp.config import Config
        from aipo_mp.models import arch_from_dir

        cfg, arch = Config(), arch_from_dir(source)
    else:
        cfg = load_config(args.model_config)
        if cfg.model.arch is not None and cfg.model.path and not Path(cfg.model.path).exists():
            cfg.model.path = None  # a recipe naming a cluster path: its model.arch stands in
        arch = resolve_arch(cfg)
    if arch.num_layers < 1 or arch.hidden_size < 1:
        raise PlanError(f"{args.model_config}: model.arch is incomplete (num_layers, hidden_size, ...)")
    rows = plan(arch, args.gpus, args.gpu, args.seq_length, args.global_batch_pairs, args.gpus_per_node,
                reference_mode=args.reference_mode, distributed_optimizer=not args.no_distributed_optimizer,
                efficiency=args.efficiency, recompute=args.recompute, model_name=Path(args.model_config).stem,
                etps=etps, freeze_router=args.freeze_router)
    if not rows:
        raise PlanError(f"no valid layout of {args.gpus} GPUs for this model: tp must divide the heads "
                        f"({arch.num_attention_heads}/{arch.num_key_value_heads}) and {args.gpus_per_node}, pp the "
                        f"{arch.num_layers} layers, and dp = gpus/(tp·pp) the global batch {args.global_batch_pairs}")
    ss = sampling_settings(cfg, args.prompts_per_engine)
    recipe = recipe_engine(cfg, arch, args.gpu, args.gpus_per_node, ss)
    if args.json:
        sys.stdout.write(json.dumps(plan_json(rows, args.top, arch, args.gpu, args.gpus_per_node, ss, recipe),
                                    indent=1) + "\n")
        return 0
    sys.stdout.write(format_plan(rows, args.top, ss, recipe))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`aipo-mp plan ...` (argv without the leading "plan"). Returns the exit code: 0, or 2 after
    one `error: ...` line on stderr for a user mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        argv = argv[1:]
    try:
        return run(build_parser().parse_args(argv))
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UserError as e:  # PlanError, ConfigError, a damaged model dir
        msg = "; ".join(getattr(e, "errors", None) or [str(e)])
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
