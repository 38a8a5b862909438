"""hf-to-mcore: an HF safetensors directory -> an aipo_mp Megatron checkpoint at any TP/PP/VPP layout.

Streaming: every rank builds its model chunks without initialising them (their memory is never
touched), and saves them through `dist_checkpointing` with a planner that makes each write
item's tensor only when a writer thread writes it: the rank's slice is copied straight from the
memory-mapped HF file into a fresh tensor (the fused QKV, gated-MLP and TP slicing happen in
that one copy), written, and dropped. A rank therefore holds about `--threads` tensors at a
time, whatever the number of layers.
"""

from __future__ import annotations

import time

import torch

from aipo_mp.convert.common import (
    BYTES_PER,
    build_for_conversion,
    check_layout,
    choose_dtype,
    hf_source,
    rank_stats,
    setup_parallel,
)
from aipo_mp.convert.row_map import row_blocks
from aipo_mp.convert.tensor_io import IOStats, SafetensorsSource, save_lazily
from aipo_mp.errors import CheckpointError


class ShardMaker:
    """view of a (never filled) parameter -> a new tensor with that view's rows, read from HF."""

    def __init__(self, built, source: SafetensorsSource):
        from aipo_mp.models.build import global_param_names

        self.built, self.source = built, source
        self.params = {}
        for chunk in built.chunks:
            params = dict(chunk.named_parameters())
            for local, gname in global_param_names(chunk).items():
                rule, index = built.family.rule_for(built.arch, gname)
                p = params[local]
                self.params[p.untyped_storage().data_ptr()] = (p, rule, index, gname)

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        found = self.params.get(view.untyped_storage().data_ptr())
        if found is None:  # not a parameter (a buffer holding real data): write it as it is
            return view.detach().clone()
        from aipo_mp.models.build import parallel_rank_and_size

        p, rule, index, gname = found
        row = p[0].numel() if p.dim() > 1 else 1
        start = view.storage_offset() - p.storage_offset()
        if not view.is_contiguous() or start % row or view.numel() % row:
            raise RuntimeError(f"{gname}: write item is not a run of rows (internal error)")
        a, b = start // row, (start + view.numel()) // row
        out = torch.empty(view.shape, dtype=p.dtype)
        rows = out.view(b - a, *p.shape[1:])
        blocks = row_blocks(rule, index, self.built.arch, *parallel_rank_and_size(rule), self.source.shape)
        if sum(blk.n for blk in blocks) != p.shape[0]:
            self._mismatch(gname, rule, index, (sum(blk.n for blk in blocks),), tuple(p.shape))
        for blk in blocks:
            lo, hi = max(a, blk.dst), min(b, blk.dst + blk.n)
            if lo >= hi:
                continue
            src = self.source.view(blk.hf_name).narrow(0, blk.src + lo - blk.dst, hi - lo)
            if blk.cols is not None:
                src = src.narrow(1, blk.cols[0], blk.cols[1] - blk.cols[0])
            if tuple(src.shape[1:]) != tuple(p.shape[1:]):
                self._mismatch(gname, rule, index, tuple(src.shape), tuple(p.shape))
            dst = rows[lo - a:hi - a]
            # The one copy, page cache -> shard: a positioned read for whole rows of the same
            # dtype, else from the mapped file (column slices; the cast happens in the copy).
            if blk.cols is not None or not self.source.read_rows_into(dst, blk.hf_name, blk.src + lo - blk.dst):
                dst.copy_(src)
        return out

    @staticmethod
    def _mismatch(gname, rule, index, got, want):
        hf_names = ", ".join(rule.hf_at(index))
        raise CheckpointError(f"shape mismatch for {gname} (from {hf_names}): tp shard {got}, model expects {want}; "
                          "the weights do not match config.json")


def hf_to_mcore_rank(args) -> dict:
    from aipo_mp.training.checkpoint import save_model

    t0 = time.perf_counter()
    src = hf_source(args.hf, args.allow_pickle)
    dtype = choose_dtype(args.dtype, src.dtype, f"{src.dir}")
    vpp = args.vpp or 1
    check_layout(src.arch, args.tp, args.pp, vpp)
    setup_parallel(args.tp, args.pp, vpp)
    built = build_for_conversion(src.family, src.arch, args.tp, args.pp, vpp, dtype)
    t_build = time.perf_counter()
    make = ShardMaker(built, SafetensorsSource(src.weights))
    stats = IOStats()
    threads = getattr(args, "threads", None) or 2
    save_model(built, args.out, hf_config=src.hf_config, extra_files_from=src.dir, dtype=dtype, overwrite=args.overwrite,
               sharded_save=lambda sd, path: save_lazily(sd, path, make, threads, stats))
    t_save = time.perf_counter()
    local_bytes = sum(p.numel() * p.element_size() for c in built.chunks for p in c.parameters())
    return rank_stats(build_s=t_build - t0, convert_s=t_save - t_build, total_s=t_save - t0, threads=threads,
                      local_param_bytes=local_bytes, family=src.family.name, dtype=dtype, num_params=src.num_params,
                      model_bytes=src.num_params * BYTES_PER[dtype], layout=dict(tp=args.tp, pp=args.pp, vpp=vpp),
                      **stats.as_dict())
