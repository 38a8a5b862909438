"""mcore-to-hf: an aipo_mp Megatron checkpoint -> an HF safetensors directory that transformers
and vLLM load.

Streaming, without building a model: the ranks split the HF tensors (whole layers, in order)
among themselves; each rank plans its safetensors files (names, shapes, dtypes) from the
checkpoint's metadata, then `--threads` writer threads each fill one file: read the stored
chunks of one Megatron tensor of one layer (TP shards are merged on read, whatever layout the
checkpoint was saved at), split it into its HF tensors, append them, drop them. A rank holds
about `--threads` Megatron tensors of one layer at a time, whatever the number of layers.

Families that store a layer's experts fused (gpt-oss: `mlp.experts.gate_up_proj` [E, H, 2I] with
gate and up interleaved, `down_proj` [E, I, H], and their biases) are written in that layout: the
fused tensor's header entry is planned from the metadata, then its bytes are appended expert by
expert (each expert's Megatron tensor read whole, transposed / interleaved, written, dropped), so
a writer thread holds one expert's tensor, not the layer's.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import torch

from aipo_mp.convert.common import BYTES_PER, expected_hf_shapes, is_enospc, parse_size, peak_rss_bytes
from aipo_mp.convert.row_map import checkpoint_key, hf_rows, layers_stacked, row_blocks
from aipo_mp.convert.tensor_io import (
    DistCheckpointReader,
    Entry,
    IOStats,
    Pieces,
    finalize_hf_dir,
    plan_files,
    write_part_files,
)
from aipo_mp.errors import CheckpointError
from aipo_mp.models import num_params
from aipo_mp.models.build import to_hf
from aipo_mp.models.family import GLU, WHOLE_TENSOR, rule_indices


class Unit:
    """One Megatron tensor of one layer (or a non-layer tensor) and the HF tensors it becomes."""

    def __init__(self, rule, index: dict, key: str, prefix: tuple[int, ...], reader: DistCheckpointReader, arch,
                 out_dtype: torch.dtype):
        self.rule, self.index, self.key, self.prefix = rule, index, key, prefix
        full = reader.global_shape(key)
        self.shape = tuple(full[len(self.prefix):])
        names = rule.hf_at(index)
        self.arch = arch
        dtype = torch.float32 if rule.fp32 else out_dtype  # DeepSeek's expert bias stays fp32, as HF keeps it
        if rule.transform in WHOLE_TENSOR:  # reordered columns (gpt-oss's experts): the whole tensor, transformed
            self.blocks = None
            hf = to_hf(rule, torch.empty(self.shape, device="meta"), arch)
            self.entries = [Entry(n, tuple(t.shape), dtype) for n, t in zip(names, hf)]
            return
        # The HF shape a copy or gate/up rule implies (the fused QKV needs none: the arch has it).
        hf_shape = (self.shape[0] // 2, *self.shape[1:]) if rule.transform == GLU else self.shape
        blocks = row_blocks(rule, index, arch, 0, 1, lambda name: hf_shape)
        self.blocks = {n: hf_rows(blocks, n) for n in names}
        self.entries = [Entry(n, (sum(b.n for b in self.blocks[n]), *self.shape[1:]), dtype) for n in names]

    def read_rows(self, reader: DistCheckpointReader, start: int, n: int, stats: IOStats) -> torch.Tensor:
        offsets = (*self.prefix, start, *([0] * (len(self.shape) - 1)))
        sizes = (*([1] * len(self.prefix)), n, *self.shape[1:])
        return reader.read(self.key, offsets, sizes, stats).view(n, *self.shape[1:])

    def produce(self, reader: DistCheckpointReader, stats: IOStats) -> list[torch.Tensor]:
        if self.blocks is None:
            whole = self.read_rows(reader, 0, self.shape[0], stats)
            with stats.timed("transform"):
                return [t.to(e.dtype).contiguous() for t, e in zip(to_hf(self.rule, whole, self.arch), self.entries)]
        out, whole = [], None
        for e in self.entries:
            blocks = self.blocks[e.name]
            if len(blocks) == 1:  # one run of rows (copy, gate/up halves): read just that region
                t = self.read_rows(reader, blocks[0].dst, blocks[0].n, stats)
            else:  # fused QKV: read the layer's tensor once, gather each group's rows
                if whole is None:
                    whole = self.read_rows(reader, 0, self.shape[0], stats)
                with stats.timed("transform"):
                    t = torch.empty(e.shape, dtype=whole.dtype)
                    for b in blocks:
                        t[b.src:b.src + b.n].copy_(whole[b.dst:b.dst + b.n])
            if t.dtype != e.dtype:
                with stats.timed("transform"):
                    t = t.to(e.dtype)
            out.append(t)
        return out


class FusedUnit:
    """A layer's expert tensor as the family stores it fused over the experts ([experts, ...]:
    gpt-oss), from the per-expert units of that layer: written expert by expert (`Pieces`), so a
    writer holds one expert's tensor, never the layer's."""

    def __init__(self, name: str):
        self.name, self.parts = name, []

    @property
    def entries(self) -> list[Entry]:
        one = self.parts[0].entries[0]
        return [Entry(self.name, (len(self.parts), *one.shape), one.dtype)]

    def produce(self, reader: DistCheckpointReader, stats: IOStats) -> list[Pieces]:
        e = self.entries[0]
        return [Pieces(e.shape, e.dtype, lambda: (u.produce(reader, stats)[0].unsqueeze(0) for u in self.parts))]


def fuse_expert_units(family, units: list) -> list:
    """Units of a family with fused expert storage: each layer's per-expert units of one tensor
    (consecutive, experts in order) become one FusedUnit in place of the first."""
    out, fused = [], {}
    for u in units:
        name = family.fused_name(u.entries[0].name) if len(u.entries) == 1 else None
        if name is None:
            out.append(u)
            continue
        if name not in fused:
            fused[name] = FusedUnit(name)
            out.append(fused[name])
        fused[name].parts.append(u)
    return out


def export_units(family, arch, reader: DistCheckpointReader, out_dtype: torch.dtype) -> list[Unit]:
    """The checkpoint's tensors in HF order (embedding, layer 0 with its experts, 1, ..., the rest),
    each checked against config.json from the metadata alone: a missing tensor, a missing expert
    or a shape config.json does not imply is one error line naming the HF tensor(s) it would be."""
    first, layers, last = [], {}, []
    keys = set(reader.keys())
    stacked = layers_stacked(keys)
    every = family.hf_names(arch)
    shapes = expected_hf_shapes(arch, every)
    for rule in family.rules(arch):
        if rule.te_alias:
            continue  # the TE spec's name of a tensor its local-spec rule already exports (same checkpoint key)
        if rule.megatron == "output_layer.weight" and arch.tie_embeddings:
            continue  # the embedding is the HF tensor
        for index in rule_indices(rule, arch):
            key, prefix = checkpoint_key(rule.megatron, index, arch, stacked)
            what = f"{key}{list(prefix) if prefix else ''} (HF {', '.join(rule.hf_at(index))})"
            if key not in keys:
                raise CheckpointError(f"{reader.dir}: the checkpoint has no tensor {what}; it is incomplete or not a "
                                      f"{family.name} checkpoint of this shape: re-create it")
            full = reader.global_shape(key)
            if len(full) <= len(prefix) or any(p >= n for p, n in zip(prefix, full)):
                raise CheckpointError(f"{reader.dir}: the checkpoint's {key} has shape {full}, which holds no "
                                      f"{what}; it does not match its config.json ({arch.num_experts} experts, "
                                      f"{arch.num_layers} layers): re-create it")
            region = (*prefix, *([0] * (len(full) - len(prefix))))
            if not reader.covers(key, region, (*([1] * len(prefix)), *full[len(prefix):])):
                raise CheckpointError(f"{reader.dir}: the checkpoint does not store all of {what}; it is incomplete: "
                                      "re-create it")
            unit = Unit(rule, index, key, prefix, reader, arch, out_dtype)
            for e in unit.entries:
                want = shapes.get(e.name)
                if want is not None and tuple(e.shape) != tuple(want):
                    raise CheckpointError(f"{reader.dir}: {key}{list(prefix) if prefix else ''} makes {e.name} of "
                                          f"shape {tuple(e.shape)}, but config.json implies {tuple(want)}; the "
                                          "checkpoint does not match its config.json: re-create it")
            if "i" in index:
                layers.setdefault(index["i"], []).append(unit)
            else:
                (first if rule.megatron.startswith("embedding.") else last).append(unit)
    return fuse_expert_units(family, first + [u for i in sorted(layers) for u in layers[i]] + last)


def split_evenly(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """A contiguous run of units per rank, of about equal bytes."""
    sizes = [sum(e.nbytes for e in u.entries) for u in units]
    total, acc, mine = sum(sizes), 0, []
    for u, s in zip(units, sizes):
        owner = min(world - 1, int((acc + s / 2) * world / max(total, 1)))
        if owner == rank:
            mine.append(u)
        acc += s
    return mine


RESTORED_CONFIG_KEYS = ("num_nextn_predict_layers",)  # how many multi-token-prediction layers the HF dir holds
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "fp64": torch.float64}


def write_dropped(tmp: Path, source: Path, family, arch, max_bytes: int, stats: IOStats) -> dict:
    """(rank 0) --restore-dropped: the tensors import dropped (DeepSeek-V3's multi-token-prediction
    layer), copied from the source HF directory one tensor at a time, as its reader presents
    them (bf16 bytes unchanged; FP8 dequantized to bf16, since the export has no quantization)."""
    from aipo_mp.convert.common import dropped_names
    from aipo_mp.convert.hf_io import HFWeights

    weights = HFWeights(source)
    groups = [[Entry(n, tuple(weights.shape(n)), TORCH_DTYPES[weights.dtype(n)])]
              for n in dropped_names(weights, family, arch)]
    return write_part_files(tmp, "partrestored", plan_files(groups, max_bytes),
                            lambda group: [weights.get(group[0].name).contiguous()], 1, stats)


def restored_config(source: Path) -> dict:
    from aipo_mp.convert.hf_io import read_hf_config_file

    hf = read_hf_config_file(source / "config.json")
    return {k: hf[k] for k in RESTORED_CONFIG_KEYS if k in hf}


def mcore_to_hf_rank(args) -> dict:
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config
    from aipo_mp.training.checkpoint import (
        DTYPES,
        EXTRA_SUBDIR,
        MODEL_SUBDIR,
        disk_is_full,
        on_rank0_then_agree,
        partial_path,
        prepare_partial,
        publish_partial,
        read_meta,
        remove_partial,
    )

    t0 = time.perf_counter()
    ckpt = Path(args.ckpt).absolute()
    meta = read_meta(ckpt)
    family, arch = family_for_hf_config(meta["hf_config"]), arch_from_hf_config(meta["hf_config"])
    out_dtype = args.dtype or meta["dtype"]
    max_bytes = parse_size(args.max_shard_size)
    threads = getattr(args, "threads", None) or 2
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        reader = DistCheckpointReader(ckpt / MODEL_SUBDIR)
    except CheckpointError:  # a file that fails its checksum, already named
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint is a user-facing condition
        raise CheckpointError(f"{ckpt / MODEL_SUBDIR}: cannot read the checkpoint metadata ({type(e).__name__}: {e}); "
                          "the checkpoint is incomplete or damaged: re-create it")
    units = split_evenly(export_units(family, arch, reader, DTYPES[out_dtype]), rank, world)
    by_first = {u.entries[0].name: u for u in units}
    # Files no larger than --max-shard-size, and at least one per writer thread.
    mine = sum(e.nbytes for u in units for e in u.entries)
    files = plan_files([u.entries for u in units], max(1, min(max_bytes, -(-mine // threads))))
    final = Path(args.out).absolute()
    on_rank0_then_agree(lambda: prepare_partial(final, args.overwrite))
    tmp = partial_path(final)
    stats = IOStats()
    try:
        t_plan = time.perf_counter()
        try:
            written = write_part_files(tmp, f"part{rank:05d}", files,
                                       lambda group: by_first[group[0].name].produce(reader, stats), threads, stats)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if disk_is_full(tmp) and not is_enospc(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(final)) from e
            if isinstance(e, (RuntimeError, EOFError, OSError)) and not is_enospc(e) and "internal error" not in str(e):
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{ckpt / MODEL_SUBDIR}: cannot read the model weights ({type(e).__name__}: "
                                  f"{first[:300]}); the checkpoint is incomplete or damaged: re-create it") from e
            raise
        torch.distributed.barrier()
        hf_config = family.export_config(meta["hf_config"]) if family.export_config else meta["hf_config"]
        restore = getattr(args, "restore_dropped", None)
        if restore:
            on_rank0_then_agree(lambda: write_dropped(tmp, Path(restore), family, arch, max_bytes, stats))
            hf_config = {**hf_config, **restored_config(Path(restore))}
        done = on_rank0_then_agree(lambda: finalize_hf_dir(tmp, ckpt / EXTRA_SUBDIR, hf_config, out_dtype,
                                                           family.export_names(arch)))
        on_rank0_then_agree(lambda: publish_partial(final))
        t_done = time.perf_counter()
    except BaseException:
        if rank == 0:
            remove_partial(final)
        raise
    return dict(rank=rank, peak_rss_bytes=peak_rss_bytes(), build_s=t_plan - t0, convert_s=t_done - t_plan, total_s=t_done - t0, threads=threads,
                family=family.name, dtype=out_dtype, num_params=num_params(arch),
                model_bytes=num_params(arch) * BYTES_PER[out_dtype], layout=meta["layout"],
                shards=(done or {}).get("files"), files=written["files"],
                largest_tensor_bytes=max((e.nbytes for u in units for e in u.entries), default=0), **stats.as_dict())
