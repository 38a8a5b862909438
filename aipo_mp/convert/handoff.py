"""The round handoff: the trainer writes the policy it holds as an HF safetensors directory for
the next round's vLLM engines, so no one re-reads the checkpoint it has just saved.

Each pipeline stage writes its own layers, at the same time as the other stages; within a stage
the tensor-parallel shards of one parameter are gathered on TP rank 0 (one parameter at a time),
split into its HF tensors and appended to a safetensors file planned beforehand. Data-parallel
replicas other than the first write nothing. The result equals `python -m checkpoint_tools
mcore-to-hf` of the checkpoint saved from the same weights, tensor for tensor, with the same
config and tokenizer files (tested).

Mixture-of-experts layers: the experts of expert-parallel rank r live on other ranks than the
dense weights' first data-parallel replica, so expert parameters take their own path: on each
pipeline stage, expert-data-parallel rank 0 of every EP rank gathers its experts' shards over the
expert-tensor-parallel group on ETP rank 0, which writes them (global expert indices, HF's
per-expert names) into a part of its own. Dense parameters (the router included) keep the path
above. Every HF tensor is written exactly once (finalize_hf_dir checks the names; tested against
the source HF directory at EP2, TP2 x EP2 x ETP2 with SP, and PP2 x EP2).

Families that store a layer's experts fused (gpt-oss) need all of a layer's experts in one HF
tensor: each expert is merged over expert-TP on its EP rank and sent to EP rank 0, which appends
it to the fused tensor expert by expert (write_fused_experts), holding one expert at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from aipo_mp.models.build import global_param_names, mapped_buffer_names, parallel_rank_and_size, to_hf
from aipo_mp.models.family import COLUMN, GLU, GLU_COLUMN, NONE, ROW


def write_policy_hf(built, directory: str | Path, hf_config: dict, extra_files_from: Optional[str | Path],
                    dtype: str, max_shard_bytes: int = 5 * 10**9) -> Path:
    """Collective over all ranks. Writes `directory` atomically (replacing an existing one)."""
    from aipo_mp.convert.tensor_io import IOStats, finalize_hf_dir
    from aipo_mp.training.checkpoint import (
        DTYPES,
        on_rank0_then_agree,
        partial_path,
        prepare_partial,
        publish_partial,
        remove_partial,
    )

    final = Path(directory).absolute()
    on_rank0_then_agree(lambda: prepare_partial(final, overwrite=True))
    tmp = partial_path(final)
    try:
        write_stage(built, tmp, DTYPES[dtype], max_shard_bytes, IOStats())
        torch.distributed.barrier()
        names = built.family.export_names(built.arch)
        # As mcore-to-hf writes it (DeepSeek-V3: the routing keys vLLM needs, no quantization_config).
        hf_config = built.family.export_config(hf_config) if built.family.export_config else hf_config
        on_rank0_then_agree(lambda: finalize_hf_dir(tmp, Path(extra_files_from) if extra_files_from else None,
                                                    hf_config, dtype, names))
        on_rank0_then_agree(lambda: publish_partial(final))
    except BaseException:
        if torch.distributed.get_rank() == 0:
            remove_partial(final)
        raise
    return final


def stage_units(built, out_dtype: torch.dtype, experts: bool = False) -> list[tuple]:
    """(parameter, rule, index, HF entries) of this rank's chunks, in order: the dense parameters,
    or (experts=True) the expert parameters; the tied output layer is left out (the embedding is
    the HF tensor). Entry shapes are those of the parameter merged over its split group (TP, or
    expert-TP for experts)."""
    from aipo_mp.convert.tensor_io import Entry

    grow = {COLUMN: 0, GLU_COLUMN: 0, ROW: 1}
    units = []
    for chunk in built.chunks:
        # Parameters, and the buffers the mapping table holds (DeepSeek's expert bias, kept fp32).
        params = {**dict(chunk.named_parameters()), **dict(chunk.named_buffers())}
        for local, gname in {**global_param_names(chunk), **mapped_buffer_names(built, chunk)}.items():
            rule, index = built.family.rule_for(built.arch, gname)
            if rule.expert != experts:
                continue
            if rule.megatron == "output_layer.weight" and built.arch.tie_embeddings:
                continue
            p = params[local]
            shape = list(p.shape)
            if rule.split in grow:
                shape[grow[rule.split]] *= parallel_rank_and_size(rule)[1]
            hf = to_hf(rule, torch.empty(shape, device="meta"), built.arch)
            dtype = torch.float32 if rule.fp32 else out_dtype
            entries = [Entry(n, tuple(t.shape), dtype) for n, t in zip(rule.hf_at(index), hf)]
            units.append((p, rule, index, entries))
    return units


def write_stage(built, directory: Path, out_dtype: torch.dtype, max_bytes: int, stats) -> None:
    """(Every rank.) This pipeline stage's part: the dense parameters from data-parallel rank 0
    (gathered over TP), and, for MoE models, this EP rank's experts from expert-data-parallel
    rank 0 (gathered over expert-TP), each into part files of their own."""
    from megatron.core import parallel_state as ps

    stage = f"part{ps.get_pipeline_model_parallel_rank():05d}"
    if ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
        write_units(built, directory, stage, stage_units(built, out_dtype), ps.get_tensor_model_parallel_group(),
                    ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(), out_dtype,
                    max_bytes, stats)
    if built.arch.num_experts and ps.get_expert_data_parallel_rank() == 0:
        units = stage_units(built, out_dtype, experts=True)
        if units and built.family.expert_slices:  # gpt-oss: a layer's experts fused in one tensor
            write_fused_experts(built, directory, f"{stage}-experts", units, out_dtype, max_bytes, stats)
        elif units:
            write_units(built, directory, f"{stage}-experts{ps.get_expert_model_parallel_rank():05d}", units,
                        ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank(),
                        ps.get_expert_tensor_parallel_world_size(), out_dtype, max_bytes, stats)


def write_units(built, directory: Path, part: str, units: list[tuple], group, rank: int, size: int,
                out_dtype: torch.dtype, max_bytes: int, stats) -> None:
    """Every rank of `group` takes part in the gathers of `units`; its rank 0 writes `part`."""
    from aipo_mp.convert.tensor_io import plan_files, write_part_files

    if rank != 0:
        for p, rule, _, _ in units:
            if size > 1 and rule.split != NONE:
                receive_merged(p.detach(), rule, group, rank, size)
        return
    by_first = {u[3][0].name: u for u in units}

    def produce(group_entries) -> list[torch.Tensor]:
        p, rule, layer, entries = by_first[group_entries[0].name]
        t = p.detach()
        merged = receive_merged(t, rule, group, 0, size) if size > 1 and rule.split != NONE else [t]
        return [x.to(device="cpu", dtype=e.dtype) for x, e in zip(hf_tensors(rule, merged, built.arch), entries)]

    # One writer thread: the gathers must run in the same order on every rank of the group.
    files = plan_files([u[3] for u in units], max_bytes)
    write_part_files(directory, part, files, produce, 1, stats)


def hf_tensors(rule, merged: list[torch.Tensor], arch) -> list[torch.Tensor]:
    """The HF tensors of a parameter merged over its split group: receive_merged gives the gated
    MLP as [gate, up], which are its HF tensors as they are (GLU) or fused first (gpt-oss's
    interleaved experts); every other transform applies to the one merged tensor."""
    if rule.transform == GLU and len(merged) == 2:
        return merged
    return to_hf(rule, torch.cat(merged) if len(merged) == 2 else merged[0], arch)


def write_fused_experts(built, directory: Path, part: str, units: list[tuple], out_dtype: torch.dtype,
                        max_bytes: int, stats) -> None:
    """A family that stores each layer's experts fused ([experts, ...]: gpt-oss) on one pipeline
    stage: ETP rank 0 of EP rank 0 writes every fused tensor expert by expert (`Pieces`). Expert
    e's parameter is merged over expert-TP on its owner EP rank's ETP rank 0, turned into its HF
    tensor there and sent over the expert-parallel group to the writer, which appends it and
    drops it: the writer holds one expert's tensor (plus its merge buffer), never a layer's.
    Every rank of the stage's EP x ETP grid (expert-data-parallel rank 0) walks the same order:
    layer, tensor, global expert."""
    from megatron.core import parallel_state as ps

    from aipo_mp.convert.tensor_io import Entry, Pieces, plan_files, write_part_files

    ep_group, etp_group = ps.get_expert_model_parallel_group(), ps.get_expert_tensor_parallel_group()
    ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    etp_size = ps.get_expert_tensor_parallel_world_size()
    experts = built.arch.num_experts
    local = experts // ps.get_expert_model_parallel_world_size()
    mine, fused = {}, {}  # (fused name, global expert) -> unit; fused name -> (entry of one expert, rule)
    for unit in units:
        name = built.family.fused_name(unit[3][0].name)
        mine[name, unit[2]["e"]] = unit
        fused.setdefault(name, (unit[3][0], unit[1]))

    def expert_tensor(name: str, e: int) -> Optional[torch.Tensor]:
        """Expert e's HF tensor on the writer (None elsewhere); every rank calls it in the same order."""
        owner, (one, rule) = e // local, fused[name]
        if ep_rank == owner:
            p = mine[name, e][0].detach()
            merged = receive_merged(p, rule, etp_group, etp_rank, etp_size) \
                if etp_size > 1 and rule.split != NONE else [p]
            if etp_rank != 0:
                return None
            t = hf_tensors(rule, merged, built.arch)[0].to(device="cpu", dtype=one.dtype).contiguous()
            if owner == 0:
                return t
            torch.distributed.send(t, dst=torch.distributed.get_global_rank(ep_group, 0), group=ep_group)
            return None
        if ep_rank == 0 and etp_rank == 0:
            buf = torch.empty(one.shape, dtype=one.dtype)
            torch.distributed.recv(buf, src=torch.distributed.get_global_rank(ep_group, owner), group=ep_group)
            return buf
        return None

    if ep_rank != 0 or etp_rank != 0:
        for name in fused:
            for e in range(experts):
                expert_tensor(name, e)
        return
    entries = {name: Entry(name, (experts, *one.shape), one.dtype) for name, (one, _) in fused.items()}

    def produce(group_entries) -> list[Pieces]:
        e0 = group_entries[0]
        return [Pieces(e0.shape, e0.dtype,
                       lambda: (expert_tensor(e0.name, e).unsqueeze(0) for e in range(experts)))]

    # One writer thread: the sends and merges must run in the same order on every rank.
    files = plan_files([[entries[name]] for name in fused], max_bytes)
    write_part_files(directory, part, files, produce, 1, stats)


def receive_merged(t: torch.Tensor, rule, group, tp_rank: int, tp_size: int) -> Optional[list]:
    """Merge the TP shards of one parameter on TP rank 0, receiving one shard at a time into a
    reused buffer and copying it straight into place: the merged tensor plus one shard is all
    that is ever held. Returns [merged] (or [gate, up] for the gated MLP, which is never fused)
    on TP rank 0, None elsewhere. Same layout as aipo_mp.models.build.tp_merge. `group` is the
    group the parameter is split over (TP, or expert-TP for experts)."""
    dist = torch.distributed
    if tp_rank != 0:
        dist.send(t.contiguous(), dst=dist.get_global_rank(group, 0), group=group)
        return None
    n0 = t.shape[0]
    if rule.split == COLUMN:
        outs = [t.new_empty((tp_size * n0, *t.shape[1:]))]

        def place(r, shard):
            outs[0][r * n0:(r + 1) * n0].copy_(shard)
    elif rule.split == ROW:
        n1 = t.shape[1]
        outs = [t.new_empty((n0, tp_size * n1, *t.shape[2:]))]

        def place(r, shard):
            outs[0][:, r * n1:(r + 1) * n1].copy_(shard)
    elif rule.split == GLU_COLUMN:
        h = n0 // 2
        outs = [t.new_empty((tp_size * h, *t.shape[1:])), t.new_empty((tp_size * h, *t.shape[1:]))]

        def place(r, shard):
            outs[0][r * h:(r + 1) * h].copy_(shard[:h])
            outs[1][r * h:(r + 1) * h].copy_(shard[h:])
    else:
        raise ValueError(f"unknown TP split {rule.split!r}")
    place(0, t)
    buf = torch.empty_like(t) if tp_size > 1 else None
    for r in range(1, tp_size):
        dist.recv(buf, src=dist.get_global_rank(group, r), group=group)
        place(r, buf)
    return outs
