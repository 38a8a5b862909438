"""Conversions between Hugging Face safetensors directories and aipo_mp Megatron checkpoints
(`aipo_mp.checkpoint`), at any TP/PP/VPP layout, plus verification and inspection.

The command line is in `__main__.py` (`python -m checkpoint_tools --help`). This module holds
the pieces it runs:

- checks that need no process group (`check_*`, `hf_source`): every user mistake becomes a
  one-line `ConfigError` before any process starts or any byte is written;
- the per-rank programs (`hf_to_mcore_rank`, `mcore_to_hf_rank`, `verify_rank`), run on every
  rank of a gloo/NCCL process group at the requested layout;
- `inspect_dir` and the HF reference logits for `verify`.

Memory: hf-to-mcore reads only this rank's slice of each HF tensor (safetensors slicing), so a
rank holds its own shard of the model and nothing more. mcore-to-hf gathers one tensor at a
time to the TP-rank-0 of each pipeline stage and writes bounded safetensors shards from there:
no process ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aipo_mp.config import ConfigError, ModelArch, ParallelConfig, layout_errors

# torch (and megatron) are imported inside the functions, so importing this package is cheap:
# usage errors answer at once, and any `spawn`ed helper process re-importing it stays light.

SUPPORTED_DTYPES = ("bf16", "fp32")
SAFETENSORS_DTYPES = {"BF16": "bf16", "F32": "fp32", "F16": "fp16", "F64": "fp64"}
BYTES_PER = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
INDEX = "model.safetensors.index.json"

# Tensors some HF exports carry that are not parameters (recomputed buffers).
IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: use a size such as 5GB, 500MB or 2GiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    base = 1024 if binary else 1000
    value = int(num * base ** " KMGT".index(unit or " "))
    if value < 1:
        raise ConfigError(f"--max-shard-size {text!r}: must be positive")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def peak_rss_bytes() -> int:
    """Peak resident set (getrusage): includes pages of memory-mapped files, i.e. the parts of
    the safetensors source read through mmap, which the page cache shares and can drop."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class AnonMemorySampler:
    """Peak anonymous (private) resident memory of this process, sampled from /proc/self/status
    every 20 ms by a daemon thread: the memory a conversion really needs, without mapped files.
    Linux only (`peak` stays None elsewhere)."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="anon-rss-sampler", daemon=True)

    @staticmethod
    def current() -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.current()
            if now is not None:
                self.peak = max(self.peak or 0, now)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        now = self.current()
        if now is not None:
            self.peak = max(self.peak or 0, now)
        return False


def is_enospc(exc: BaseException) -> bool:
    """A full disk, also when it surfaces wrapped (dist_checkpointing writers, safetensors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_destination(out: str | Path, overwrite: bool) -> Path:
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    return out


def check_free_space(out: Path, needed: int, what: str) -> None:
    where = existing_ancestor(out.parent)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise ConfigError(
            f"not enough disk space for {what} at {where}: needs about {human_bytes(needed)}, "
            f"{human_bytes(free)} free; free space or choose another --out (or pass --skip-space-check)"
        )


def check_layout(arch: ModelArch, tp: int, pp: int, vpp: int) -> None:
    errors = layout_errors(arch, ParallelConfig(tp=tp, pp=pp, vpp=vpp))
    if errors:
        text = "; ".join(errors)
        for key in ("tp", "pp", "vpp"):
            text = text.replace(f"parallel.{key}", f"--{key}")
        raise ConfigError(text)


def check_weight_files(directory: Path, allow_pickle: bool) -> None:
    """Refuse pickled weights (they can run code) before anything loads them."""
    from aipo_mp.hf_io import check_index_files

    check_index_files(directory)  # shards the index names must all be there
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        if not allow_pickle:
            raise ConfigError(
                f"{directory}: holds only pickled .bin weights, which can run code when loaded; convert "
                "them to safetensors or pass --allow-pickle if you trust the source"
            )
        return
    raise ConfigError(f"{directory}: no *.safetensors weights found")


# ---------------------------------------------------------------------------------------------
# HF source: config, family, names and shapes, checked before any process starts
# ---------------------------------------------------------------------------------------------


@dataclass
class HFSource:
    dir: Path
    hf_config: dict
    family: object  # aipo_mp.models.base.Family
    arch: ModelArch
    weights: object  # aipo_mp.hf_io.HFWeights
    dtype: str  # fp32 | bf16 | fp16 ...
    num_params: int
    num_bytes: int


def hf_config_and_arch(directory: str | Path):
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"HF directory not found: {d}")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{d} has no config.json; point --hf to a Hugging Face model directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})")
    family = family_for_hf_config(hf)  # unsupported architecture -> ConfigError listing the supported ones
    return hf, family, arch_from_hf_config(hf)


def expected_hf_shapes(arch: ModelArch, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each HF tensor name of the llama-style families."""
    h, f, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv, v = arch.num_attention_heads * hd, arch.num_key_value_heads * hd, arch.vocab_size
    table = (
        ("embed_tokens.weight", (v, h)), ("lm_head.weight", (v, h)), ("norm.weight", (h,)), ("layernorm.weight", (h,)),
        ("q_proj.weight", (q, h)), ("k_proj.weight", (kv, h)), ("v_proj.weight", (kv, h)), ("o_proj.weight", (h, q)),
        ("gate_proj.weight", (f, h)), ("up_proj.weight", (f, h)), ("down_proj.weight", (h, f)),
    )
    out = {}
    for name in names:
        for suffix, shape in table:
            if name.endswith(suffix):
                out[name] = shape
                break
    return out


def tensor_dtype(weights, name: str) -> str:
    if weights._pickled is not None:
        return str(weights._pickled[name].dtype).replace("torch.", "").replace("float32", "fp32").replace(
            "bfloat16", "bf16").replace("float16", "fp16")
    raw = weights._handle(weights.files[name]).get_slice(name).get_dtype()
    return SAFETENSORS_DTYPES.get(raw, raw.lower())


def hf_source(directory: str | Path, allow_pickle: bool = False) -> HFSource:
    """Open an HF directory and check it completely (names, shapes) without reading weights."""
    from aipo_mp.hf_io import HFWeights

    d = Path(directory)
    hf, family, arch = hf_config_and_arch(d)
    check_weight_files(d, allow_pickle)
    weights = HFWeights(d, allow_pickle=allow_pickle)
    expected = family.hf_names(arch)
    have = set(weights.names())
    ignorable = {n for n in have if IGNORABLE.search(n)}
    if arch.tie_embeddings and "lm_head.weight" in have:
        ignorable.add("lm_head.weight")  # some exports store the tied copy; the embedding is used
    missing = [n for n in expected if n not in have]
    unexpected = sorted(have - set(expected) - ignorable)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConfigError(f"{d}: missing tensors {', '.join(missing[:5])}{more}; the checkpoint is incomplete "
                          f"or does not match its config.json ({family.name}, {arch.num_layers} layers)")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ConfigError(f"{d}: unexpected tensors {', '.join(unexpected[:5])}{more}; they do not belong to a "
                          f"{family.name} model as its config.json describes it; fix the config or the weights")
    shapes = expected_hf_shapes(arch, expected)
    num_params = num_bytes = 0
    dtypes = set()
    for name in expected:
        got = tuple(weights.shape(name))
        want = shapes.get(name)
        if want is not None and got != want:
            raise ConfigError(f"{d}: tensor {name} has shape {got} but config.json implies {want}; "
                              "the weights do not match config.json")
        n = 1
        for s in got:
            n *= s
        dt = tensor_dtype(weights, name)
        dtypes.add(dt)
        num_params += n
        num_bytes += n * BYTES_PER.get(dt, 4)
    dtype = sorted(dtypes)[0] if len(dtypes) == 1 else "mixed(" + ",".join(sorted(dtypes)) + ")"
    return HFSource(d, hf, family, arch, weights, dtype, num_params, num_bytes)


def choose_dtype(requested: Optional[str], source: str, what: str) -> str:
    if requested:
        return requested
    if source in SUPPORTED_DTYPES:
        return source
    raise ConfigError(f"{what} is stored as {source}; pass --dtype bf16 or --dtype fp32")


# ---------------------------------------------------------------------------------------------
# Reading only this rank's slice of each HF tensor
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Writing HF safetensors shards from the TP-rank-0 of each pipeline stage
# ---------------------------------------------------------------------------------------------


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


class ShardWriter:
    """Buffers HF tensors up to `max_bytes` and writes them as numbered safetensors files."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int):
        self.dir, self.prefix, self.max = directory, prefix, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[dict] = []
        self.written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.size + nbytes > self.max:
            self.flush()
        self.buf[name] = tensor
        self.size += nbytes

    def flush(self) -> None:
        if not self.buf:
            return
        fname = f"{self.prefix}-{len(self.files):05d}.safetensors"
        write_shard(self.dir / fname, self.buf)
        self.files.append({"file": fname, "names": list(self.buf), "bytes": self.size})
        self.written += self.size
        self.buf, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        (self.dir / f"{self.prefix}.json").write_text(json.dumps(self.files))


def owned_copy(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, and not a view into a bigger tensor (safetensors refuses shared storage)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


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


def default_generation_config(hf_config: dict) -> dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            out[key] = hf_config[key]
    return out


def finalize_hf_dir(tmp: Path, ckpt: Path, meta: dict, out_dtype: str, expected_names: list[str]) -> dict:
    """(global rank 0) name the shards model-0000i-of-0000n.safetensors, write the index,
    config.json, generation_config.json and the tokenizer files."""
    from aipo_mp.checkpoint import EXTRA_SUBDIR, HF_DTYPE_NAMES, copy_extra_files

    stages = sorted(tmp.glob("stage*.json"))
    files = [f for s in stages for f in json.loads(s.read_text())]
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
    for s in stages:
        s.unlink()
    missing = [x for x in expected_names if x not in weight_map]
    if missing:
        raise RuntimeError(f"export lost tensors {missing[:5]} (internal error)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    cfg = dict(meta["hf_config"])
    cfg["torch_dtype"] = cfg["dtype"] = HF_DTYPE_NAMES[out_dtype]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copy_extra_files(ckpt / EXTRA_SUBDIR, tmp)
    if not (tmp / "generation_config.json").exists():
        (tmp / "generation_config.json").write_text(json.dumps(default_generation_config(cfg), indent=2) + "\n")
    return {"files": n, "total_size": total}


# ---------------------------------------------------------------------------------------------
# The per-rank programs (every rank of the process group runs one)
# ---------------------------------------------------------------------------------------------


def _setup(tp: int, pp: int, vpp: int) -> None:
    from aipo_mp import platform

    platform.initialize_model_parallel(tp, pp, vpp)
    platform.seed_model_parallel_rng(0)


def _build(family, arch: ModelArch, tp: int, pp: int, vpp: int, dtype: str):
    from aipo_mp.config import PrecisionConfig
    from aipo_mp.models.base import build_model

    # Every weight is overwritten by the conversion: skip megatron's (full-size, per-rank) init.
    built = build_model(family, arch, ParallelConfig(tp=tp, pp=pp, vpp=vpp),
                        PrecisionConfig(dtype=dtype, backend="local"), initialize=False)
    assert built.config.perform_initialization is False
    for chunk in built.chunks:
        chunk.eval()
    return built


def _rank_stats(**extra) -> dict:
    import torch

    from megatron.core import parallel_state as ps

    return dict(rank=torch.distributed.get_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(), peak_rss_bytes=peak_rss_bytes(), **extra)


def hf_to_mcore_rank(args) -> dict:
    from aipo_mp.checkpoint import save_model

    t0 = time.perf_counter()
    src = hf_source(args.hf, args.allow_pickle)
    dtype = choose_dtype(args.dtype, src.dtype, f"{src.dir}")
    vpp = args.vpp or 1
    check_layout(src.arch, args.tp, args.pp, vpp)
    _setup(args.tp, args.pp, vpp)
    built = _build(src.family, src.arch, args.tp, args.pp, vpp, dtype)
    t_build = time.perf_counter()
    bytes_read = load_hf_shards(built, src.weights)
    t_load = time.perf_counter()
    save_model(built, args.out, hf_config=src.hf_config, extra_files_from=src.dir, dtype=dtype, overwrite=args.overwrite)
    t_save = time.perf_counter()
    local_bytes = sum(p.numel() * p.element_size() for c in built.chunks for p in c.parameters())
    return _rank_stats(build_s=t_build - t0, load_s=t_load - t_build, save_s=t_save - t_load,
                       total_s=t_save - t0, bytes_read=bytes_read, local_param_bytes=local_bytes,
                       family=src.family.name, dtype=dtype, num_params=src.num_params,
                       model_bytes=src.num_params * BYTES_PER[dtype], layout=dict(tp=args.tp, pp=args.pp, vpp=vpp))


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
    _setup(tp, pp, vpp)
    built = _build(family, arch, tp, pp, vpp, meta["dtype"])
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
    return _rank_stats(build_s=t_build - t0, load_s=t_load - t_build, export_s=t_done - t_load, total_s=t_done - t0,
                       local_param_bytes=local_bytes, family=family.name, dtype=out_dtype, num_params=arch.num_params(),
                       model_bytes=arch.num_params() * BYTES_PER[out_dtype], layout=dict(tp=tp, pp=pp, vpp=vpp),
                       shards=(written or {}).get("files"), **exported)


def verify_rank(args) -> dict:
    import torch

    from aipo_mp.checkpoint import load_model, read_meta
    from aipo_mp.engine import forward_only
    from aipo_mp.logprobs import gather_vocab_parallel
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    meta = read_meta(args.ckpt)
    family, arch = family_for_hf_config(meta["hf_config"]), arch_from_hf_config(meta["hf_config"])
    tp, pp, vpp = verify_layout(args, meta)
    check_layout(arch, tp, pp, vpp)
    ref = torch.load(args.reference, weights_only=True)
    _setup(tp, pp, vpp)
    built = _build(family, arch, tp, pp, vpp, "fp32")
    load_model(built, args.ckpt)
    batch = ref["batch"]
    worst = torch.zeros((), dtype=torch.float64)

    def collect(logits, b):
        nonlocal worst
        full = gather_vocab_parallel(logits)[0].double()
        for start, want in zip(b["starts"], b["want"]):
            got = full[start:start + want.shape[0]]
            worst = torch.maximum(worst, (got - want.double()).abs().max())

    batches = [batch] * (pp if vpp > 1 else 1)  # the interleaved schedule needs >= pp micro-batches
    forward_only(built.chunks, batches, collect, seq_length=batch["tokens"].shape[1], hidden_size=arch.hidden_size)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return _rank_stats(max_abs_diff=float(worst), layout=dict(tp=tp, pp=pp, vpp=vpp), family=family.name,
                       num_sequences=len(batch["starts"]))


def verify_layout(args, meta: dict) -> tuple[int, int, int]:
    """The stored layout when no --tp/--pp/--vpp is given; otherwise the given one (1 where unset)."""
    if args.tp is None and args.pp is None and args.vpp is None:
        lay = meta["layout"]
        return int(lay["tp"]), int(lay["pp"]), int(lay.get("vpp", 1))
    return args.tp or 1, args.pp or 1, args.vpp or 1


RANK_PROGRAMS = {"hf-to-mcore": hf_to_mcore_rank, "mcore-to-hf": mcore_to_hf_rank, "verify": verify_rank}


# ---------------------------------------------------------------------------------------------
# verify: HF reference logits (computed once, by the launching process)
# ---------------------------------------------------------------------------------------------


def make_reference(hf_dir: str | Path, out_path: str | Path, arch: ModelArch, seed: int = 0) -> None:
    """A packed row of three random sequences of different lengths (plus padding) and
    transformers' fp32 logits of each sequence run alone."""
    import torch

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    limit = max(4, min(arch.max_position_embeddings, 4096))
    lengths = [min(n, limit) for n in (24, 13, 7)]
    row = sum(lengths) + 4
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager",
                                                 trust_remote_code=False).eval()
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, arch.vocab_size, (n,), generator=g) for n in lengths]
    tokens = torch.zeros(1, row, dtype=torch.long)
    starts, pos = [], 0
    for s in seqs:
        tokens[0, pos:pos + len(s)] = s
        starts.append(pos)
        pos += len(s)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), row], dtype=torch.int32)
    with torch.no_grad():
        want = [model(s[None]).logits[0].float() for s in seqs]
    batch = dict(tokens=tokens, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()), starts=starts, want=want)
    torch.save({"batch": batch}, str(out_path))


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def megatron_tensor_count(model_dir: Path) -> int:
    """Parameters stored in a dist_checkpointing torch_dist checkpoint (from its .metadata)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(str(model_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint is a user-facing condition
        raise ConfigError(f"{model_dir}: cannot read the checkpoint metadata ({type(e).__name__}: {e}); "
                          "the checkpoint is incomplete or damaged")
    total = 0
    for value in md.state_dict_metadata.values():
        if isinstance(value, TensorStorageMetadata):
            n = 1
            for s in value.size:
                n *= s
            total += n
    return total


def inspect_dir(path: str | Path, allow_pickle: bool = False) -> dict:
    from aipo_mp.checkpoint import is_megatron_checkpoint, read_meta
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"not a directory: {d}")
    if is_megatron_checkpoint(d):
        meta = read_meta(d)
        family, arch = family_for_hf_config(meta["hf_config"]), arch_from_hf_config(meta["hf_config"])
        stored = megatron_tensor_count(d / "model")
        return dict(path=str(d), kind="megatron", format=meta["format"], family=family.name,
                    architecture=(meta["hf_config"].get("architectures") or [None])[0], layout=meta["layout"],
                    dtype=meta["dtype"], num_params=stored, num_params_config=meta["num_params"],
                    bytes=dir_bytes(d / "model"), arch=shape_summary(arch))
    src = hf_source(d, allow_pickle)
    files_bytes = sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in d.glob(pat))
    return dict(path=str(d), kind="hf", format="safetensors" if src.weights._pickled is None else "pickle",
                family=src.family.name, architecture=(src.hf_config.get("architectures") or [None])[0],
                layout=None, dtype=src.dtype, num_params=src.num_params, num_params_config=src.arch.num_params(),
                bytes=files_bytes, arch=shape_summary(src.arch))


def shape_summary(arch: ModelArch) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "tie_embeddings")
    return {k: getattr(arch, k) for k in keys}


def format_inspect(info: dict) -> str:
    a = info["arch"]
    lay = info["layout"]
    layout = f"tp={lay['tp']} pp={lay['pp']} vpp={lay.get('vpp', 1)}" if lay else "none (Hugging Face, unsharded)"
    lines = [
        f"path:        {info['path']}",
        f"kind:        {'aipo_mp Megatron checkpoint (' + info['format'] + ')' if info['kind'] == 'megatron' else 'Hugging Face (' + info['format'] + ')'}",
        f"family:      {info['family']} ({info['architecture']})",
        f"layout:      {layout}",
        f"dtype:       {info['dtype']}",
        f"parameters:  {info['num_params']:,} ({human_count(info['num_params'])})",
        f"bytes:       {info['bytes']:,} ({human_bytes(info['bytes'])}) of weights on disk",
        f"shape:       hidden {a['hidden_size']}, ffn {a['intermediate_size']}, {a['num_layers']} layers, "
        f"{a['num_attention_heads']} heads / {a['num_key_value_heads']} kv, head_dim {a['head_dim']}, "
        f"vocab {a['vocab_size']}{', tied embeddings' if a['tie_embeddings'] else ''}",
    ]
    if info["num_params"] != info["num_params_config"]:
        lines.append(f"warning:     config implies {info['num_params_config']:,} parameters")
    return "\n".join(lines)
