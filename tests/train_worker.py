"""One rank of the trainer layout/resume checks. argv: spec.json out_dir.

spec.json: {"config": path, "runs": [{"name": str, "overrides": [...]}]}. Each run trains with its
overrides (output.dir = out_dir/name) in this one process group; rank 0 writes
out_dir/name/params.pt with every parameter merged to its global (TP=1, PP=1) shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from aipo_mp.config import load_config
from aipo_mp.models.build import global_param_names, tp_merge
from aipo_mp.runtime import platform
from aipo_mp.training.loop import train


def gathered_params(state) -> dict[str, torch.Tensor]:
    """Global tensors of all parameters, assembled on every rank (small models only): dense ones
    from data-parallel rank 0 (TP shards merged), experts from expert-data-parallel rank 0 of each
    expert-parallel rank (expert-TP shards merged)."""
    from megatron.core import parallel_state as ps

    groups = {False: ps.get_tensor_model_parallel_group(), True: ps.get_expert_tensor_parallel_group()}
    writes = {False: ps.get_data_parallel_rank() == 0, True: ps.get_expert_data_parallel_rank() == 0}
    local = {}
    for wrapped, chunk in zip(state.chunks, state.built.chunks):
        params = dict(chunk.named_parameters())
        for name, gname in global_param_names(chunk).items():
            p = params[name].detach()
            rule, _ = state.built.family.rule_for(state.built.arch, gname)
            group = groups[rule.expert]
            shards = [torch.empty_like(p) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(shards, p.contiguous(), group=group)
            if writes[rule.expert]:
                local[gname] = tp_merge(shards, rule.split)
    everything = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everything, local)
    merged = {}
    for part in everything:
        merged.update(part)
    return merged


def main():
    spec = json.load(open(sys.argv[1]))
    out = Path(sys.argv[2])
    env = platform.init_distributed()
    for run in spec["runs"]:
        cfg = load_config(spec["config"], run["overrides"] + [f"output.dir={out / run['name']}"])
        state = train(cfg)
        params = gathered_params(state)
        if env.rank == 0:
            torch.save(params, out / run["name"] / "params.pt")
        torch.distributed.barrier()
    platform.shutdown()


if __name__ == "__main__":
    main()
