"""Process start-up: torch.distributed from torchrun or Slurm variables, device choice, and the
CPU shims that let megatron-core run on gloo. Every CPU workaround lives in this one module and
is applied only when CUDA is absent."""

from __future__ import annotations

import datetime
import os
import re
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from aipo_mp.runtime.spawn import free_port


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First host name of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_default_port(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes do not collide."""
    digits = int(re.sub(r"\D", "", job_id) or "0")
    return 20000 + digits % 20000


def read_dist_env(port: Optional[int] = None, environ: Optional[dict] = None) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun sets SLURM_*. torchrun wins when
    both are present (torchrun started inside an allocation)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", port or 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        default_port = slurm_default_port(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=int(env.get("MASTER_PORT", port or default_port)),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", port or free_port(), "single")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def init_distributed(port: Optional[int] = None, timeout_minutes: int = 30) -> DistEnv:
    """Start torch.distributed (NCCL on CUDA, gloo otherwise). Idempotent."""
    env = read_dist_env(port)
    if torch.distributed.is_initialized():
        return env
    if has_cuda():
        # megatron orders TP/SP communication and compute on one hardware queue (and asserts
        # it for TP overlap); must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        apply_cpu_shims()
        backend = "gloo"
    torch.distributed.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return env


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# CPU shims. megatron-core assumes CUDA in a few places; these make it run on CPU with gloo.
# ---------------------------------------------------------------------------------------------

_SHIMS_APPLIED = False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Pipeline schedules, FP32Optimizer and the tied-embedding set-up create tensors with a
    hard-coded device="cuda" or call `.cuda()`; rewrite those to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda,):
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_cuda(dev):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers and grad clipping check `param.type()` against
            # 'torch.cuda.*Tensor' names (optimizer.py, distrib_optimizer.py, clip_grads.py; the
            # only zero-argument .type() calls in megatron/core): answer with the CUDA name of
            # the same dtype. Only the name changes; the tensor and the numerics do not.
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


_CPU_MODE: Optional[_CudaToCpuMode] = None


def apply_cpu_shims() -> None:
    """Applied once per process, only when CUDA is absent."""
    global _SHIMS_APPLIED, _CPU_MODE
    if _SHIMS_APPLIED or has_cuda():
        return
    # RoPE (RotaryEmbedding.get_emb), the attention memory buffer and dist_checkpointing save
    # ask torch.cuda.current_device(); answer with the CPU device.
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing save and the async writers call torch.cuda.synchronize(); nothing to wait for.
    torch.cuda.synchronize = lambda *a, **k: None
    # Hard-coded device="cuda" in schedules and optimizers (see _CudaToCpuMode). Reading `.grad`
    # through the mode makes torch warn about megatron's non-leaf parameter views (their grads
    # live in megatron's buffers, not in .grad): noise on every run's console, not a problem.
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor")
    _CPU_MODE = _CudaToCpuMode()
    _CPU_MODE.__enter__()
    apply_moe_cpu_shims()
    _SHIMS_APPLIED = True


def apply_moe_cpu_shims() -> None:
    """megatron's MoE layers on CPU/gloo (see ../shared/FACTS-style notes in docs/moe.md):
    1. moe_utils names `te_general_gemm` only when TE imports; the router asks for it anyway.
    2. the all-to-all dispatcher copies its split sizes to the host on a side CUDA stream; on CPU
       they are turned into host arrays directly, which is all that copy was for.
    3. expert-TP > 1 all-gathers uneven token counts; gloo's list all_gather needs even sizes:
       pad to the largest, gather, trim."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    dispatcher.cuda_dtoh_stream = "cpu"  # never used as a stream: _maybe_dtoh_and_synchronize is replaced

    def host_splits(self, point, tokens_per_expert=None):
        if self.drop_and_pad or point != self.cuda_dtoh_point:
            return tokens_per_expert
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            setattr(self, name, value.numpy() if torch.is_tensor(value) else value)
        return tokens_per_expert

    dispatcher._maybe_dtoh_and_synchronize = host_splits
    even_gather = mappings._gather_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or len(set(output_split_sizes)) == 1:
            return even_gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)])

    mappings._gather_along_first_dim = gather_uneven


def apply_mla_shims() -> None:
    """megatron's multi-latent attention without Transformer Engine (the CPU machines, and GPU
    machines without the TE wheel): megatron installs a stand-in for TE's modules when TE is
    absent, which makes multi_latent_attention.py believe TE exists (its HAVE_TE is set) and
    compare the spec's linears against the stand-ins. Tell it the truth; with TE installed this
    does nothing."""
    from megatron.core.transformer import multi_latent_attention

    if not _importable("transformer_engine"):
        multi_latent_attention.HAVE_TE = False


_EXPERT_BIAS_FIX_APPLIED = False


def apply_expert_bias_fix() -> None:
    """megatron 0.16.1 counts each expert's tokens for the expert-bias update with
    `routing_map & ~padding_mask`, a [tokens, experts] map against a [tokens] mask: it fails (or,
    when tokens == experts, masks the wrong entries) whenever a padding mask reaches the router,
    which the trainer always passes to MoE models. Count with the mask per token instead; the same
    numbers megatron means, on any device. Applied once per process, for models with an expert bias."""
    global _EXPERT_BIAS_FIX_APPLIED
    from megatron.core.transformer.moe.router import TopKRouter

    if _EXPERT_BIAS_FIX_APPLIED:
        return

    def count_routed_tokens(self, routing_map, padding_mask=None):
        if self.enable_expert_bias and torch.is_grad_enabled():  # not in evaluation or recomputation
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.reshape(-1, 1)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    TopKRouter._apply_expert_bias = count_routed_tokens
    _EXPERT_BIAS_FIX_APPLIED = True


# ---------------------------------------------------------------------------------------------
# megatron's distributed optimizer over torch's AdamW (no apex / Transformer Engine installed: the
# CPU machines, and GPU machines without those wheels). AdamW keeps a `step` tensor per parameter;
# megatron 0.16.1 assumes fused Adam's per-group step in three places, fixed here:
#  1. a fresh optimizer cannot build its loading state dict (`state_dict()` asserts exactly one
#     `step` value over an empty state): the state is initialised first, by an AdamW step with
#     lr = 0 and weight decay 0 on zero gradients (moments stay 0, parameters unchanged; the
#     loaded checkpoint then overwrites parameters, moments and step);
#  2. on load one shared `step` tensor goes into every parameter's state, so AdamW would advance
#     it once per parameter per step (wrong bias correction): each parameter gets its own copy;
#  3. `fully_reshardable` load copies every state key from the checkpoint, and `step` is not
#     among them (KeyError): the step comes from the loaded param groups (set by fix 2's copy).
# None of these changes a number of an uninterrupted run.
# ---------------------------------------------------------------------------------------------

_ADAMW_FIXES_APPLIED = False


def apply_torch_adamw_fixes() -> None:
    """Applied once per process, only when megatron steps torch's AdamW (apex/TE absent)."""
    global _ADAMW_FIXES_APPLIED
    from megatron.core.optimizer import distrib_optimizer

    if _ADAMW_FIXES_APPLIED or distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    original_set = cls._set_main_param_and_optimizer_states
    original_sharded = cls.sharded_state_dict

    def set_with_own_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            state["step"] = state["step"].detach().clone()  # fixes 2 and 3
            tensors = {**tensors, "step": state["step"]}
        return original_set(self, model_param, tensors)

    def sharded_state_dict_initialised(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
        if is_loading and not self.is_stub_optimizer and len(self.optimizer.state) == 0:
            init_adamw_state(self.optimizer)  # fix 1
        return original_sharded(self, model_sharded_state_dict or {}, is_loading, **kwargs)

    cls._set_main_param_and_optimizer_states = set_with_own_step
    cls.sharded_state_dict = sharded_state_dict_initialised
    _ADAMW_FIXES_APPLIED = True


@torch.no_grad()
def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (zero moments, step 1) without changing any parameter."""
    saved = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
        for p in g["params"]:
            if p.numel():
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, (lr, wd) in zip(optimizer.param_groups, saved):
        g["lr"], g["weight_decay"] = lr, wd
        for p in g["params"]:
            p.grad = None


def seed_model_parallel_rng(seed: int) -> None:
    """megatron's CUDA RNG tracker needs CUDA; on CPU install its no-op tracker, so dropout uses
    the CPU generator (seeded here per rank as megatron would)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if has_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed, inference_rng_tracker=True, force_reset_rng=True
        )


def initialize_model_parallel(tp: int, pp: int, vpp: Optional[int] = None, cp: int = 1, ep: int = 1,
                              etp: Optional[int] = None) -> None:
    """megatron's process groups; ep/etp build the expert mesh (etp x ep x expert-DP per pipeline
    stage) beside the dense one, over the same ranks."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp or 1,
    )


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def gpu_fast_paths(activation) -> dict:
    """TransformerConfig switches for the GPU hot path, each only where its kernel exists (none
    on CPU): pipeline outputs freed once sent; the fused SwiGLU (megatron's jit fuser, SiLU
    models); Transformer Engine's fused RoPE (also for packed THD rows); gradient accumulation
    fused into the weight-gradient GEMM (needs apex's fused_weight_gradient_mlp_cuda, which the
    output layer's ColumnParallelLinear uses even with TE layers)."""
    import torch.nn.functional as F

    if not has_cuda():
        return {}
    out = {"deallocate_pipeline_outputs": True}
    if activation is F.silu:
        out["bias_activation_fusion"] = True
    if _importable("transformer_engine"):
        out["apply_rope_fusion"] = True
    if _importable("fused_weight_gradient_mlp_cuda"):
        out["gradient_accumulation_fusion"] = True
    return out


def p2p_settings() -> dict:
    """TransformerConfig fields for pipeline p2p: batched isend/irecv needs NCCL on gloo."""
    if has_cuda():
        return {}
    return {"batch_p2p_comm": False, "batch_p2p_sync": False}


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption, time limits) set a flag the training loop polls, so
    the current step finishes and a checkpoint is saved. Install it first thing, before the slow
    imports and set-up, so an early signal is not fatal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            signal.signal(sig, self._request)
        return self

    def _request(self, signum, _frame) -> None:
        self.requested = True




def shutdown() -> None:
    # Not imported (a program that needed no model parallelism): nothing to destroy, and no
    # seconds spent importing megatron to find that out.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
