"""One rank of the planner-vs-trainer check. argv: spec.json out.json.

For each run (overrides of a tiny training config) it builds the trainer's state, takes one
optimizer step, and reports what this rank really holds: parameters (all of them, the trainable
ones, and the expert weights megatron keeps in its expert-parallel gradient buffer), parameter,
gradient (megatron DDP main_grad, fp32) and optimizer-state bytes (megatron's optimizer: fp32 main weights that are not
the model's own tensors, and the Adam moments), and, for single-stage layouts, the bytes of tensors
autograd saves for the backward of one packed row (the activation memory of a micro-batch)."""

from __future__ import annotations

import json
import sys

import torch

from aipo_mp.config import load_config
from aipo_mp.runtime import platform
from aipo_mp.training.batches import row_batch, step_rows
from aipo_mp.training.forward import model_forward
from aipo_mp.training.loop import train_step
from aipo_mp.training.optim import optimizer_state_bytes
from aipo_mp.training.reference import compute_reference
from aipo_mp.training.state import setup


def saved_activation_bytes(state) -> tuple[int, int]:
    """Unique storage bytes autograd keeps for the backward of one row's forward, and the row's
    length in tokens (rows are sized to their content, so each rank's first row has its own)."""
    seen: dict[int, int] = {}
    params = {p.data_ptr() for c in state.chunks for p in c.parameters()}  # frozen ones too

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    batch = row_batch(step_rows(state, 0)[0])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model_forward(state.chunks[0], batch["tokens"], batch["cu_seqlens"], batch["max_seqlen"])
    del out
    return sum(seen.values()), int(batch["tokens"].numel())


def measure(state) -> dict:
    from megatron.core import parallel_state as ps

    expert = [p for c in state.chunks for p in c.parameters() if not getattr(p, "allreduce", True)]
    return {
        "rank": torch.distributed.get_rank(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "edp_rank": ps.get_expert_data_parallel_rank(),
        "all_params": sum(p.numel() for c in state.chunks for p in c.parameters()),
        "expert_params": sum(p.numel() for p in expert),  # megatron's separate expert buffer (ep > 1)
        "params": sum(p.numel() for p in state.params),
        "weight_bytes": sum(p.numel() * p.element_size() for c in state.chunks for p in c.parameters()),
        "grad_bytes": sum(p.main_grad.numel() * p.main_grad.element_size() for p in state.params),
        "optimizer_bytes": optimizer_state_bytes(state.optimizer, state.chunks),
    }


def main():
    spec = json.load(open(sys.argv[1]))
    env = platform.init_distributed()
    results = []
    for run in spec["runs"]:
        cfg = load_config(None, run["overrides"])
        state = setup(cfg)
        state.ref_table = compute_reference(state)
        train_step(state, 0)
        row = measure(state)
        row["name"] = run["name"]
        if cfg.parallel.pp == 1:
            row["activation_bytes"], row["row_tokens"] = saved_activation_bytes(state)
        gathered = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, row)
        results.append(gathered)
    if env.rank == 0:
        json.dump(results, open(sys.argv[2], "w"))
    platform.shutdown()


if __name__ == "__main__":
    main()
