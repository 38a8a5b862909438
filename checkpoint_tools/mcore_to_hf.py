"""mcore-to-hf: an aipo_mp Megatron checkpoint -> an HF safetensors directory that transformers and vLLM load."""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Optional

import torch

from checkpoint_tools.common import BYTES_PER, build_for_conversion, is_enospc, parse_size, rank_stats, setup_parallel
from checkpoint_tools.tensor_io import ShardWriter, finalize_hf_dir, owned_copy


def receive_merged(t: torch.Tensor, rule, group, tp_rank: int, tp_size: int) -> Optional[list]:
    """Merge the TP shards of one parameter on TP rank 0, receiving one shard at a time into a
    reused buffer and copying it straight into place: the merged tensor plus one shard is all
    that is ever held. Returns [merged] (or [gate, up] for the gated MLP, which is never fused)
    on TP rank 0, None elsewhere. Same layout as aipo_mp.models.base.tp_merge."""
    import torch

    from aipo_mp.models.base import COLUMN, GLU_COLUMN, ROW

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


def export_hf_shards(built, directory: Path, out_dtype: torch.dtype, max_bytes: int) -> dict:
    """Collective over the TP group: merge each parameter on TP rank 0 (one tensor at a time),
    convert it to HF names and hand it to this stage's ShardWriter."""
    import torch

    from megatron.core import parallel_state as ps

    from aipo_mp.models.base import GLU_COLUMN, NONE, global_param_names, megatron_state_to_hf

    group = ps.get_tensor_model_parallel_group()
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    writer = ShardWriter(directory, f"stage{pp_rank:03d}", max_bytes) if tp_rank == 0 else None
    largest = 0
    for chunk in built.chunks:
        params = dict(chunk.named_parameters())
        for local, gname in global_param_names(chunk).items():
            rule, layer = built.family.rule_for(built.arch, gname)
            if rule.megatron == "output_layer.weight" and built.arch.tie_embeddings:
                continue  # the embedding is the HF tensor
            t = params[local].detach()
            if tp_size > 1 and rule.split != NONE:
                merged = receive_merged(t, rule, group, tp_rank, tp_size)
            else:
                merged = [t] if tp_rank == 0 else None  # replicated: TP rank 0 writes it
            if merged is None:
                continue
            if rule.split == GLU_COLUMN and len(merged) == 2:
                hf = dict(zip((n.format(i=layer) for n in rule.hf), merged))
            else:
                hf = megatron_state_to_hf(built, {gname: merged[0]})
            del merged
            largest = max(largest, sum(x.numel() * x.element_size() for x in hf.values()))
            for name in list(hf):
                writer.add(name, owned_copy(hf.pop(name).to(out_dtype)))
            del hf
    if writer is not None:
        writer.close()
        return {"bytes_written": writer.written, "files": len(writer.files), "largest_tensor_bytes": largest}
    return {"bytes_written": 0, "files": 0, "largest_tensor_bytes": largest}


def mcore_to_hf_rank(args) -> dict:
    import torch

    from aipo_mp.checkpoint import (
        DTYPES, disk_is_full, load_model, on_rank0_then_agree, partial_path, prepare_partial, publish_partial, read_meta,
        remove_partial,
    )
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    t0 = time.perf_counter()
    ckpt = Path(args.ckpt).absolute()
    meta = read_meta(ckpt)
    family, arch = family_for_hf_config(meta["hf_config"]), arch_from_hf_config(meta["hf_config"])
    lay = meta["layout"]
    tp, pp, vpp = int(lay["tp"]), int(lay["pp"]), int(lay.get("vpp", 1))
    out_dtype = args.dtype or meta["dtype"]
    max_bytes = parse_size(args.max_shard_size)
    setup_parallel(tp, pp, vpp)
    built = build_for_conversion(family, arch, tp, pp, vpp, meta["dtype"])
    final = Path(args.out).absolute()
    on_rank0_then_agree(lambda: prepare_partial(final, args.overwrite))
    tmp = partial_path(final)
    try:
        t_build = time.perf_counter()
        load_model(built, ckpt)
        t_load = time.perf_counter()
        try:
            exported = export_hf_shards(built, tmp, DTYPES[out_dtype], max_bytes)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if not isinstance(e, (KeyboardInterrupt, SystemExit)) and disk_is_full(tmp) and not is_enospc(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(final)) from e
            raise
        torch.distributed.barrier()
        written = on_rank0_then_agree(lambda: finalize_hf_dir(tmp, ckpt, meta, out_dtype, family.hf_names(arch)))
        on_rank0_then_agree(lambda: publish_partial(final))
        t_done = time.perf_counter()
    except BaseException:
        if torch.distributed.get_rank() == 0:
            remove_partial(final)
        raise
    local_bytes = sum(p.numel() * p.element_size() for c in built.chunks for p in c.parameters())
    return rank_stats(build_s=t_build - t0, load_s=t_load - t_build, export_s=t_done - t_load, total_s=t_done - t0,
                       local_param_bytes=local_bytes, family=family.name, dtype=out_dtype, num_params=arch.num_params(),
                       model_bytes=arch.num_params() * BYTES_PER[out_dtype], layout=dict(tp=tp, pp=pp, vpp=vpp),
                       shards=(written or {}).get("files"), **exported)

