"""hf-to-mcore: an HF safetensors directory -> an aipo_mp Megatron checkpoint at any TP/PP/VPP (and,
for mixture-of-experts models, EP/ETP) layout.

Streaming: every rank builds its model chunks without initialising them (their memory is never
touched), and saves them through `dist_checkpointing` with a planner that makes each write
item's tensor only when a writer thread writes it: the rank's slice is copied straight from the
memory-mapped HF file into a fresh tensor (the fused QKV, gated-MLP and TP slicing happen in
that one copy), written, and dropped. A rank therefore holds about `--threads` tensors at a
time, whatever the number of layers. A rule whose transform reorders columns (gpt-oss's
interleaved gate/up and transposed down projections) is made from one expert's whole HF tensor,
transformed and then sliced: bounded by one expert. With expert parallelism a rank holds (and so reads and
writes) only its experts: global experts ep_rank * E/EP ... (ep_rank + 1) * E/EP - 1, each split
over the expert-tensor-parallel group; expert-data-parallel replicas write nothing twice.
"""

from __future__ import annotations

import time

import torch

from aipo_mp.convert.common import (
    BYTES_PER,
    build_for_conversion,
    check_layout,
    choose_dtype,
    expert_tp,
    hf_source,
    rank_stats,
    setup_parallel,
)
from aipo_mp.convert.row_map import row_blocks
from aipo_mp.convert.tensor_io import IOStats, SafetensorsSource, save_lazily
from aipo_mp.errors import CheckpointError
from aipo_mp.models.family import WHOLE_TENSOR


class ShardMaker:
    """view of a (never filled) parameter -> a new tensor with that view's rows, read from HF."""

    def __init__(self, built, source: SafetensorsSource):
        from aipo_mp.models.build import global_param_names, mapped_buffer_names

        self.built, self.source = built, source
        self.params = {}
        self.buffers = set()
        for chunk in built.chunks:
            # Parameters, and the buffers the mapping table holds (DeepSeek's expert bias), come
            # from the HF files; other buffers are written as the model holds them.
            tensors = {**dict(chunk.named_parameters()), **dict(chunk.named_buffers())}
            for local, gname in {**global_param_names(chunk), **mapped_buffer_names(built, chunk)}.items():
                rule, index = built.family.rule_for(built.arch, gname)
                p = tensors[local]
                self.params[p.untyped_storage().data_ptr()] = (p, rule, index, gname)
            self.buffers |= {b.untyped_storage().data_ptr() for b in chunk.buffers()}

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        ptr = view.untyped_storage().data_ptr()
        found = self.params.get(ptr)
        if found is None:
            if ptr in self.buffers:  # a buffer, which holds real data: written as it is
                return view.detach().clone()
            # The model was built without initialising it: writing this would store garbage.
            raise RuntimeError(f"a write item of shape {tuple(view.shape)} is neither a parameter nor a buffer of the "
                               "model (internal error)")
        from aipo_mp.models.build import parallel_rank_and_size

        p, rule, index, gname = found
        row = p[0].numel() if p.dim() > 1 else 1
        start = view.storage_offset() - p.storage_offset()
        if not view.is_contiguous() or start % row or view.numel() % row:
            raise RuntimeError(f"{gname}: write item is not a run of rows (internal error)")
        a, b = start // row, (start + view.numel()) // row
        out = torch.empty(view.shape, dtype=p.dtype)
        rows = out.view(b - a, *p.shape[1:])
        if rule.transform in WHOLE_TENSOR:  # gpt-oss's experts: one expert's whole tensor, then its slice
            rows.copy_(self._whole_then_slice(p, rule, index, gname)[a:b])
            return out
        blocks = row_blocks(rule, index, self.built.arch, *parallel_rank_and_size(rule), self.source.shape)
        if sum(blk.n for blk in blocks) != p.shape[0]:
            self._mismatch(gname, rule, index, (sum(blk.n for blk in blocks),), tuple(p.shape))
        for blk in blocks:
            lo, hi = max(a, blk.dst), min(b, blk.dst + blk.n)
            if lo >= hi:
                continue
            shape = self.source.shape(blk.hf_name)
            got = (hi - lo, *(shape[1:] if blk.cols is None else (blk.cols[1] - blk.cols[0], *shape[2:])))
            if tuple(got[1:]) != tuple(p.shape[1:]):
                self._mismatch(gname, rule, index, got, tuple(p.shape))
            dst = rows[lo - a:hi - a]
            if blk.hf_name in self.source.weights.fp8_scales:  # FP8: this one tensor dequantized to bf16
                src = self.source.weights.get(blk.hf_name).narrow(0, blk.src + lo - blk.dst, hi - lo)
                dst.copy_(src if blk.cols is None else src.narrow(1, blk.cols[0], blk.cols[1] - blk.cols[0]))
                continue
            # The one copy, file -> shard: a positioned read for whole rows of the same dtype,
            # else runs of rows through a small buffer (column slices; the cast happens in the copy).
            if not self.source.read_into(dst, blk.hf_name, blk.src + lo - blk.dst, blk.cols):
                src = self.source.view(blk.hf_name).narrow(0, blk.src + lo - blk.dst, hi - lo)
                dst.copy_(src if blk.cols is None else src.narrow(1, blk.cols[0], blk.cols[1] - blk.cols[0]))
        return out

    def _whole_then_slice(self, p: torch.Tensor, rule, index: dict, gname: str) -> torch.Tensor:
        """This rank's tensor of a rule whose transform reorders columns (interleaved gate/up,
        transposed down projection): the expert's whole HF tensor is read (the reader presents one
        expert's slice of the fused tensor; MXFP4 dequantized), transformed, then TP-sliced. One
        expert at a time: bounded by an expert's bytes, not a layer's."""
        from aipo_mp.models.build import parallel_rank_and_size, to_megatron, tp_slice

        hf = []
        for name in rule.hf_at(index):
            t = torch.empty(self.source.shape(name), dtype=p.dtype)
            if not self.source.read_into(t, name, 0):
                t.copy_(self.source.view(name))
            hf.append(t)
        shard = tp_slice(to_megatron(rule, hf, self.built.arch), rule.split, *parallel_rank_and_size(rule))
        if tuple(shard.shape) != tuple(p.shape):
            self._mismatch(gname, rule, index, tuple(shard.shape), tuple(p.shape))
        return shard

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
    vpp, ep = args.vpp or 1, getattr(args, "ep", 1)
    etp = expert_tp(src.arch, args.tp, ep, getattr(args, "etp", None))
    check_layout(src.arch, args.tp, args.pp, vpp, ep, etp)
    setup_parallel(args.tp, args.pp, vpp, ep, etp)
    built = build_for_conversion(src.family, src.arch, args.tp, args.pp, vpp, dtype, ep, etp)
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
                      model_bytes=src.num_params * BYTES_PER[dtype],
                      layout=dict(tp=args.tp, pp=args.pp, vpp=vpp, **(dict(ep=ep, etp=etp) if src.arch.num_experts else {})),
                      **stats.as_dict())
