"""Shared weight I/O of the converters, built so a process holds about one tensor at a time:

- `SafetensorsSource`: rows of the tensors of an HF directory read by positioned reads straight
  into their destination (or through a small bounded buffer for column slices and casts), and
  zero-copy views of its memory-mapped files (fused MoE experts appear as per-expert names:
  `aipo_mp.convert.hf_io`);
- `SafetensorsStreamWriter`: a safetensors file whose header is written first (the names, shapes
  and dtypes are planned before any data exists) and whose tensors are then appended one by one;
- `DistCheckpointReader`: any region of any tensor of a torch_dist (`dist_checkpointing`)
  checkpoint, reading only the stored chunks that overlap it;
- `save_lazily`: `dist_checkpointing.save` of a model whose tensors are made only when their
  write item is written (a torch.distributed.checkpoint save planner whose `resolve_data` calls
  back), several files in flight on threads;
- `IOStats`: bytes and seconds of reading, transforming and writing, summed over threads;
- `finalize_hf_dir`: the finished HF directory (shard names, index, config, tokenizer files).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from aipo_mp.convert.common import INDEX

ST_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "F64": torch.float64}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class IOStats:
    """Seconds and bytes per phase, summed over the threads that did the work (thread-safe)."""

    read_s: float = 0.0
    transform_s: float = 0.0
    write_s: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def timed(self, phase: str, nbytes: int = 0):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                setattr(self, f"{phase}_s", getattr(self, f"{phase}_s") + dt)
                if phase == "read":
                    self.bytes_read += nbytes
                elif phase == "write":
                    self.bytes_written += nbytes

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("read_s", "transform_s", "write_s", "bytes_read", "bytes_written")}


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# Reading an HF directory: zero-copy views over memory-mapped safetensors
# ---------------------------------------------------------------------------------------------


class SafetensorsSource:
    """Rows of the tensors of an HF directory. `read_into` fills a destination by positioned
    reads (no page faults on the mapped source, so its pages never count as this process's
    memory); `view` is a zero-copy tensor over the memory-mapped file. Pickled .bin weights
    (`HFWeights` with allow_pickle) are served from memory instead. Fused expert tensors are
    read as the per-expert names `HFWeights` presents (a contiguous run of the fused tensor's
    bytes each)."""

    CHUNK_BYTES = 8 << 20  # the bounded buffer of a column slice or cast

    def __init__(self, weights):
        self.weights = weights  # aipo_mp.convert.hf_io.HFWeights (already checked)
        self._maps: dict[str, tuple[torch.Tensor, dict, int, int]] = {}
        self._lock = threading.Lock()

    def _file(self, fname: str):
        with self._lock:
            if fname not in self._maps:
                path = self.weights.dir / fname
                with open(path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
                    # A private mapping: writable for torch.frombuffer, yet only read (file pages).
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                with_madvise(mm)
                fd = os.open(path, os.O_RDONLY)
                self._maps[fname] = (torch.frombuffer(mm, dtype=torch.uint8), header, 8 + n, fd)
            return self._maps[fname]

    def _where(self, name: str) -> tuple[int, torch.dtype, tuple[int, ...], int]:
        """(file descriptor, dtype, shape, offset of the first byte in the file) of `name`."""
        fname, stored, elems, shape = self.weights.locate(name)
        _, header, base, fd = self._file(fname)
        info = header[stored]
        dtype = ST_DTYPES[info["dtype"]]
        return fd, dtype, tuple(shape), base + info["data_offsets"][0] + elems * torch.empty((), dtype=dtype).element_size()

    def read_into(self, dst: torch.Tensor, name: str, start: int, cols: Optional[tuple[int, int]] = None) -> bool:
        """Fill `dst` with rows [start, start + len(dst)) of tensor `name` (columns `cols` of
        them when given), cast to dst's dtype. Whole rows of the same dtype: one positioned read
        straight into dst; otherwise runs of whole rows through a buffer of at most CHUNK_BYTES.
        False for a pickled source (the caller copies from `view`)."""
        if self.weights._pickled is not None:
            return False
        if self.weights.mxfp4_part(name)[0] is not None:  # MXFP4: dequantized one expert at a time
            n = dst.shape[0] if dst.dim() else 1
            self.weights.mxfp4_rows(name, start, n, dst.view(n, *dst.shape[1:]), cols)
            return True
        fd, dtype, shape, pos = self._where(name)
        row_shape = tuple(shape[1:])
        row_elems = 1
        for d in row_shape:
            row_elems *= d
        row_bytes = row_elems * torch.empty((), dtype=dtype).element_size()
        pos += start * row_bytes
        n = dst.shape[0] if dst.dim() else 1
        if start + n > shape[0]:
            raise RuntimeError(f"{name}: rows {start}..{start + n} past its {shape[0]} (internal error)")
        if cols is None and dtype == dst.dtype and dst.is_contiguous():
            _pread_into(fd, dst, pos, name, self.weights.dir)
            return True
        step = max(1, self.CHUNK_BYTES // max(row_bytes, 1))
        buf = torch.empty((min(step, n), *row_shape), dtype=dtype)
        for r in range(0, n, step):
            m = min(step, n - r)
            part = buf[:m]
            _pread_into(fd, part, pos + r * row_bytes, name, self.weights.dir)
            if cols is not None:
                part = part.narrow(1, cols[0], cols[1] - cols[0])
            dst[r:r + m].copy_(part)
        return True

    def view(self, name: str) -> torch.Tensor:
        """The whole tensor without a copy (MXFP4: dequantized, so a copy of the whole tensor:
        read experts with `read_into` to hold only them)."""
        if self.weights._pickled is not None or self.weights.mxfp4_part(name)[0] is not None:
            return self.weights.get(name)
        fd, dtype, shape, pos = self._where(name)
        raw = self._file(self.weights.locate(name)[0])[0]
        n = 1
        for d in shape:
            n *= d
        return raw[pos:pos + n * torch.empty((), dtype=dtype).element_size()].view(dtype).reshape(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.weights.shape(name))


def _pread_into(fd: int, dst: torch.Tensor, pos: int, name: str, where: Path) -> None:
    """Fill the contiguous `dst` with the file's bytes from `pos` (one positioned read, repeated
    while the kernel returns less)."""
    buf = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], pos + done)
        if got <= 0:
            raise EOFError(f"{where}: truncated at tensor {name}")
        done += got


def with_madvise(mm: mmap.mmap) -> None:
    """Tensors are read front to back: let the kernel read ahead."""
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
        try:
            mm.madvise(mmap.MADV_SEQUENTIAL)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Writing safetensors one tensor at a time
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Pieces:
    """A tensor written in consecutive parts along its first dimension, each made only when it is
    written: a layer's fused expert tensor (gpt-oss: [experts, ...]), expert by expert, so the
    writer holds one expert's part, never the layer's tensor (120b: 33 MB, not 4.2 GB)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: Callable[[], Iterator[torch.Tensor]]


def write_bytes(f, tensor: torch.Tensor) -> None:
    """The raw bytes of a contiguous CPU tensor, without an intermediate copy."""
    f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


class SafetensorsStreamWriter:
    """A safetensors file written front to back: the header (from the planned entries) first,
    then each tensor as it is produced, in the planned order."""

    def __init__(self, path: Path, entries: list[Entry]):
        self.path, self.entries, self._next = Path(path), entries, 0
        header, offset = {}, 0
        for e in entries:
            header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.total = offset
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, tensor: torch.Tensor | Pieces) -> int:
        want = self.entries[self._next]
        if name != want.name or tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
            raise RuntimeError(f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{want.name} {want.shape} {want.dtype} (internal error)")
        if isinstance(tensor, Pieces):
            self._write_pieces(name, tensor)
        else:
            write_bytes(self._f, tensor.contiguous())
        self._next += 1
        return want.nbytes

    def _write_pieces(self, name: str, pieces: Pieces) -> None:
        rows = 0
        for part in pieces.parts():
            if tuple(part.shape[1:]) != tuple(pieces.shape[1:]) or part.dtype != pieces.dtype:
                raise RuntimeError(f"{self.path.name}: part of {name} is {tuple(part.shape)} {part.dtype}, planned "
                                   f"rows of {pieces.shape} {pieces.dtype} (internal error)")
            write_bytes(self._f, part.contiguous())
            rows += part.shape[0]
            del part
        if rows != pieces.shape[0]:
            raise RuntimeError(f"{self.path.name}: {name} got {rows} of its {pieces.shape[0]} rows (internal error)")

    def close(self) -> None:
        if self._next != len(self.entries):
            raise RuntimeError(f"{self.path.name}: {len(self.entries) - self._next} planned tensors not written")
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def plan_files(groups: list[list[Entry]], max_bytes: int) -> list[list[list[Entry]]]:
    """Consecutive groups (the HF tensors made from one Megatron tensor stay together) packed
    into files of at most `max_bytes` (a single larger group gets a file of its own)."""
    files, cur, size = [], [], 0
    for g in groups:
        b = sum(e.nbytes for e in g)
        if cur and size + b > max_bytes:
            files.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += b
    if cur:
        files.append(cur)
    return files


# ---------------------------------------------------------------------------------------------
# Reading regions of a torch_dist checkpoint
# ---------------------------------------------------------------------------------------------


class DistCheckpointReader:
    """Regions of the tensors of a torch_dist checkpoint directory (dist_checkpointing's format:
    torch.distributed.checkpoint files whose items are torch.save blobs). Only the stored
    chunks that overlap a requested region are read; a region equal to one stored chunk is
    returned as loaded, without a further copy.

    `verify`: first check the directory's files against the checkpoint's manifest.json (one level
    up): a damaged file, or one copied in from another checkpoint, raises CheckpointDamaged naming
    it. Collective when torch.distributed is up (each rank checks the files its writer rank wrote)."""

    def __init__(self, directory: Path, verify: bool = True):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(directory)
        if verify:
            from aipo_mp.training.checkpoint import check_files

            check_files(self.dir.parent, self.dir.name + "/")
        self.metadata = FileSystemReader(str(self.dir)).read_metadata()
        stored: dict[str, dict[tuple, object]] = {}
        for index, info in self.metadata.storage_data.items():
            if index.offset is not None:
                stored.setdefault(index.fqn, {})[tuple(index.offset)] = info
        # Per key: its stored chunks (offsets, sizes, storage info) sorted by their first offset,
        # those first offsets, and the largest first-axis size (to find overlaps by bisection:
        # an MoE checkpoint has a chunk per expert and shard, thousands per key).
        self._by_key: dict[str, tuple[list, list, int]] = {}
        for key, infos in stored.items():
            md = self.metadata.state_dict_metadata[key]
            chunks = sorted(((tuple(c.offsets), tuple(c.sizes), infos[tuple(c.offsets)]) for c in md.chunks
                             if tuple(c.offsets) in infos), key=lambda c: c[0])
            starts = [c[0][0] if c[0] else 0 for c in chunks]
            self._by_key[key] = (chunks, starts, max((c[1][0] if c[1] else 1 for c in chunks), default=1))

    def keys(self) -> list[str]:
        return list(self._by_key)

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def _overlapping(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list:
        """(chunk offsets, chunk sizes, storage info, region lo, region hi) of the stored chunks
        that overlap the region."""
        import bisect

        chunks, starts, longest = self._by_key[key]
        if offsets:  # only chunks starting in [offsets[0] - longest + 1, offsets[0] + sizes[0]) can overlap
            lo_i = bisect.bisect_left(starts, offsets[0] - longest + 1)
            hi_i = bisect.bisect_left(starts, offsets[0] + sizes[0])
            chunks = chunks[lo_i:hi_i]
        out = []
        for c_off, c_size, info in chunks:
            lo = [max(o, co) for o, co in zip(offsets, c_off)]
            hi = [min(o + s, co + cs) for o, s, co, cs in zip(offsets, sizes, c_off, c_size)]
            if all(a < b for a, b in zip(lo, hi)):
                out.append((c_off, c_size, info, lo, hi))
        return out

    def _load_chunk(self, info) -> torch.Tensor:
        from torch.distributed.checkpoint.utils import _create_file_view

        if info.transform_descriptors:
            raise RuntimeError(f"{self.dir}: stored item uses transforms {info.transform_descriptors}; not supported")
        with open(self.dir / info.relative_path, "rb") as f:
            return torch.load(_create_file_view(f, info.offset, info.length), map_location="cpu", weights_only=True)

    def covers(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
        """Whether the stored chunks of `key` hold all of the region (from the metadata)."""
        if key not in self._by_key:
            return False
        covered = sum(_volume(lo, hi) for *_, lo, hi in self._overlapping(key, offsets, sizes))
        return covered == _volume(offsets, [o + s for o, s in zip(offsets, sizes)])

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
             stats: Optional[IOStats] = None) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of global tensor `key`."""
        if key not in self._by_key:
            raise KeyError(key)
        pieces = self._overlapping(key, offsets, sizes)
        covered = sum(_volume(lo, hi) for *_, lo, hi in pieces)
        if covered != _volume(offsets, [o + s for o, s in zip(offsets, sizes)]):
            raise RuntimeError(f"{self.dir}: tensor {key} region {offsets}+{sizes} is not fully stored")
        out = None
        for c_off, c_size, info, lo, hi in pieces:
            t0 = time.perf_counter()
            chunk = self._load_chunk(info)
            if stats is not None:
                with stats._lock:
                    stats.read_s += time.perf_counter() - t0
                    stats.bytes_read += nbytes_of(chunk)
            if tuple(chunk.shape) != c_size:
                chunk = chunk.reshape(c_size)
            part = chunk
            for d, (a, b, co) in enumerate(zip(lo, hi, c_off)):
                part = part.narrow(d, a - co, b - a)
            if len(pieces) == 1 and tuple(part.shape) == tuple(sizes) and part.is_contiguous():
                return part  # exactly one stored chunk (or a contiguous part of one): no copy
            if out is None:
                out = torch.empty(sizes, dtype=chunk.dtype)
            dst = out
            for d, (a, b, o) in enumerate(zip(lo, hi, offsets)):
                dst = dst.narrow(d, a - o, b - a)
            with _maybe(stats, "transform"):
                dst.copy_(part)
            del chunk, part
        return out


def _volume(lo, hi) -> int:
    n = 1
    for a, b in zip(lo, hi):
        n *= max(0, b - a)
    return n


@contextmanager
def _maybe(stats: Optional[IOStats], phase: str):
    if stats is None:
        yield
    else:
        with stats.timed(phase):
            yield


# ---------------------------------------------------------------------------------------------
# dist_checkpointing.save with tensors made at write time
# ---------------------------------------------------------------------------------------------


def save_lazily(sharded_state_dict: dict, directory: Path, make: Callable[[torch.Tensor], torch.Tensor],
                threads: int, stats: IOStats) -> None:
    """`dist_checkpointing.save` (torch_dist), except that the data of each write item is
    `make(view)`, called on a writer thread right before the item is written and dropped right
    after; `view` is the (never filled) local tensor the item stands for. `threads` files per
    rank are written at once. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, str(directory), sharded_strategy=_lazy_strategy(make, threads, stats))


def _lazy_strategy(make, threads: int, stats: IOStats):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
        _split_by_size_and_type,
    )
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, SerializationFormat, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return make(self.lookup_object(write_item.index))

    class LazyWriter(FileSystemWriterAsync):
        """Megatron's writer resolves (materialises) every tensor in `prepare_write_data`; this
        one only assigns items to files there and resolves each while writing it."""

        def prepare_write_data(self, plan, planner) -> None:
            self._planner = planner
            prefix = plan.storage_data.prefix
            buckets = [b for b in _split_by_size_and_type(self.thread_count, plan.items) if b]
            self.write_buckets = [(os.path.join(self.checkpoint_dir, f"{prefix}{i}{DEFAULT_SUFFIX}"),
                                   f"{prefix}{i}{DEFAULT_SUFFIX}", b) for i, b in enumerate(buckets)]
            self.results_queue = None
            self._results: Optional[list] = None

        def get_save_function_and_args(self):
            if not self.write_buckets:
                return None, None, []
            return self._write_all, None, []

        def _write_all(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(self.write_buckets), thread_name_prefix="ckpt-writer") as ex:
                results = list(ex.map(self._write_bucket, self.write_buckets))
            self._results = [r for rs in results for r in rs]

        def _write_bucket(self, bucket) -> list:
            path, storage_key, items = bucket
            out = []
            with open(path, "wb") as stream:
                for item in items:
                    if item.type == WriteItemType.BYTE_IO:
                        data = self._planner.resolve_data(item)
                    else:
                        t0 = time.perf_counter()
                        data = self._planner.resolve_data(item).detach()
                        with stats._lock:
                            stats.read_s += time.perf_counter() - t0
                            stats.bytes_read += nbytes_of(data)
                    with stats.timed("write", nbytes_of(data) if isinstance(data, torch.Tensor) else 0):
                        out.append(_write_item(self.transforms, stream, data, item, storage_key,
                                               SerializationFormat.TORCH_SAVE))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
            return out

        def retrieve_write_results(self):
            if self.write_buckets and self._results is None:
                from torch.distributed.checkpoint.api import _wrap_exception

                return _wrap_exception(RuntimeError("checkpoint writer produced no results"))
            return self._results or []

    class LazyStrategy(TorchDistSaveShardedStrategy):
        def async_save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = LazyWriter(checkpoint_dir, thread_count=self.thread_count)
            ret, *_ = save_state_dict_async_plan(
                pyt_state_dict, writer, None, 0,
                planner=LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))
            return self._get_save_and_finalize_callbacks(writer, ret)

    return LazyStrategy("torch_dist", 1, thread_count=max(1, threads))


# ---------------------------------------------------------------------------------------------
# The finished HF directory
# ---------------------------------------------------------------------------------------------


def default_generation_config(hf_config: dict) -> dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            out[key] = hf_config[key]
    return out


def finalize_hf_dir(tmp: Path, extra_from: Optional[Path], hf_config: dict, out_dtype: str,
                    expected_names: list[str]) -> dict:
    """(global rank 0) name the parts model-0000i-of-0000n.safetensors (in part order), write
    the index, config.json, generation_config.json and the tokenizer files."""
    from aipo_mp.training.checkpoint import HF_DTYPE_NAMES, copy_extra_files

    parts = sorted(tmp.glob("part*.json"))
    files = [f for p in parts for f in json.loads(p.read_text())]
    n = len(files)
    weight_map, total = {}, 0
    for i, entry in enumerate(files):
        final_name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / entry["file"], tmp / final_name)
        for name in entry["names"]:
            if name in weight_map:
                raise RuntimeError(f"tensor {name} was written twice (internal error)")
            weight_map[name] = final_name
        total += entry["bytes"]
    for p in parts:
        p.unlink()
    missing = [x for x in expected_names if x not in weight_map]
    if missing:
        raise RuntimeError(f"export lost tensors {missing[:5]} (internal error)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    cfg = dict(hf_config)
    cfg["torch_dtype"] = cfg["dtype"] = HF_DTYPE_NAMES[out_dtype]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if extra_from is not None:
        copy_extra_files(extra_from, tmp)
    if not (tmp / "generation_config.json").exists():
        (tmp / "generation_config.json").write_text(json.dumps(default_generation_config(cfg), indent=2) + "\n")
    return {"files": n, "total_size": total}


def write_part_files(directory: Path, part: str, files: list[list[list[Entry]]],
                     produce: Callable[[list[Entry]], list[torch.Tensor]], threads: int, stats: IOStats) -> dict:
    """Write this part's planned files (`threads` at a time): for each group of entries,
    `produce(group)` makes its tensors (one group in memory per thread), which are appended to
    the file and dropped. Leaves `{part}.json` listing the files for `finalize_hf_dir`."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"{part}-{k:05d}.safetensors" for k in range(len(files))]

    def one(k: int) -> dict:
        entries = [e for g in files[k] for e in g]
        writer = SafetensorsStreamWriter(directory / names[k], entries)
        try:
            for group in files[k]:
                tensors = produce(group)
                for e, t in zip(group, tensors):
                    with stats.timed("write", e.nbytes):
                        writer.write(e.name, t)
                del tensors
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return {"file": names[k], "names": [e.name for e in entries], "bytes": writer.total}

    if threads > 1 and len(files) > 1:
        with ThreadPoolExecutor(min(threads, len(files)), thread_name_prefix="hf-writer") as ex:
            listing = list(ex.map(one, range(len(files))))
    else:
        listing = [one(k) for k in range(len(files))]
    (directory / f"{part}.json").write_text(json.dumps(listing))
    return {"files": len(listing), "bytes_written": sum(x["bytes"] for x in listing)}
