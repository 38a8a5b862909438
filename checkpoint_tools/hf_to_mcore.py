"""hf-to-mcore: an HF safetensors directory -> an aipo_mp Megatron checkpoint at any TP/PP/VPP layout."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from aipo_mp.config import ConfigError, ModelArch
from checkpoint_tools.common import (
    BYTES_PER, build_for_conversion, check_layout, choose_dtype, hf_source, rank_stats, setup_parallel,
)


def read_rows_or_cols(weights, name: str, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank` of `size` equal slices of tensor `name` along `dim`, reading only that slice."""
    import torch

    if weights._pickled is not None:
        if name not in weights._pickled:
            weights.get(name)  # raises the missing-tensor error
        return torch.chunk(weights._pickled[name], size, dim=dim)[rank]
    if name not in weights.files:
        weights.get(name)
    sl = weights._handle(weights.files[name]).get_slice(name)
    full = sl.get_shape()[dim]
    if full % size:
        raise ConfigError(f"{weights.dir}: tensor {name} dimension {dim} ({full}) is not divisible by tp={size}; "
                          "choose another --tp")
    step = full // size
    a, b = rank * step, (rank + 1) * step
    return sl[a:b] if dim == 0 else sl[:, a:b]


def read_hf_shard(weights, rule, layer: Optional[int], arch: ModelArch, rank: int, size: int) -> torch.Tensor:
    """This TP rank's Megatron tensor of `rule`, reading 1/size of the HF bytes."""
    import torch

    from aipo_mp.models.base import COLUMN, COPY, GLU, GLU_COLUMN, NONE, QKV, ROW, to_megatron, tp_slice

    names = [n.format(i=layer) for n in rule.hf]
    if size == 1 or rule.split == NONE:
        return to_megatron(rule, [weights.get(n) for n in names], arch)
    if rule.transform == COPY and rule.split in (COLUMN, ROW):
        return read_rows_or_cols(weights, names[0], 0 if rule.split == COLUMN else 1, rank, size)
    if rule.transform == GLU and rule.split == GLU_COLUMN:
        return torch.cat([read_rows_or_cols(weights, n, 0, rank, size) for n in names], dim=0)
    if rule.transform == QKV and rule.split == COLUMN:
        # Rank r holds query groups [r*ng/size, (r+1)*ng/size): the matching rows of q, k and v.
        local = dataclasses.replace(arch, num_key_value_heads=arch.num_key_value_heads // size,
                                    num_attention_heads=arch.num_attention_heads // size)
        parts = [read_rows_or_cols(weights, n, 0, rank, size) for n in names]
        return to_megatron(rule, parts, local)
    full = to_megatron(rule, [weights.get(n) for n in names], arch)
    return tp_slice(full, rule.split, rank, size)


def load_hf_shards(built, weights) -> int:
    """Fill every parameter of this rank from the HF directory; returns the bytes read."""
    import torch

    from aipo_mp.models.base import global_param_names
    from aipo_mp.models.layers import tp_rank_and_size

    rank, size = tp_rank_and_size()
    read = 0
    for chunk in built.chunks:
        params = dict(chunk.named_parameters())
        for local, gname in global_param_names(chunk).items():
            rule, layer = built.family.rule_for(built.arch, gname)
            shard = read_hf_shard(weights, rule, layer, built.arch, rank, size)
            param = params[local]
            if tuple(shard.shape) != tuple(param.shape):
                hf_names = ", ".join(n.format(i=layer) for n in rule.hf)
                raise ConfigError(f"shape mismatch for {gname} (from {hf_names}): tp shard {tuple(shard.shape)}, "
                                  f"model expects {tuple(param.shape)}; the weights do not match config.json")
            with torch.no_grad():
                param.copy_(shard)
            read += shard.numel() * shard.element_size()
            del shard
    return read


def hf_to_mcore_rank(args) -> dict:
    from aipo_mp.checkpoint import save_model

    t0 = time.perf_counter()
    src = hf_source(args.hf, args.allow_pickle)
    dtype = choose_dtype(args.dtype, src.dtype, f"{src.dir}")
    vpp = args.vpp or 1
    check_layout(src.arch, args.tp, args.pp, vpp)
    setup_parallel(args.tp, args.pp, vpp)
    built = build_for_conversion(src.family, src.arch, args.tp, args.pp, vpp, dtype)
    t_build = time.perf_counter()
    bytes_read = load_hf_shards(built, src.weights)
    t_load = time.perf_counter()
    save_model(built, args.out, hf_config=src.hf_config, extra_files_from=src.dir, dtype=dtype, overwrite=args.overwrite)
    t_save = time.perf_counter()
    local_bytes = sum(p.numel() * p.element_size() for c in built.chunks for p in c.parameters())
    return rank_stats(build_s=t_build - t0, load_s=t_load - t_build, save_s=t_save - t_load,
                       total_s=t_save - t0, bytes_read=bytes_read, local_param_bytes=local_bytes,
                       family=src.family.name, dtype=dtype, num_params=src.num_params,
                       model_bytes=src.num_params * BYTES_PER[dtype], layout=dict(tp=args.tp, pp=args.pp, vpp=vpp))

