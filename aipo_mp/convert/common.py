"""What every checkpoint_tools command shares: sizes and their printing, memory sampling,
the checks that need no process group (every user mistake becomes a one-line `ConfigError` before
any process starts or any byte is written), the HF source check, and the per-rank model setup."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aipo_mp.config import ModelArch, ParallelConfig
from aipo_mp.errors import CheckpointError, ConfigError
from aipo_mp.validate import layout_errors

# torch (and megatron) are imported inside the functions, so importing this package is cheap:
# usage errors answer at once, and any `spawn`ed helper process re-importing it stays light.


SUPPORTED_DTYPES = ("bf16", "fp32")


BYTES_PER = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


INDEX = "model.safetensors.index.json"


IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


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


_PEAK_RESET = False


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement (Linux: reset the resident high-water mark), so that a
    process running several commands reports each one's own peak."""
    global _PEAK_RESET
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _PEAK_RESET = True
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set since `reset_peak_rss` (else of the process, getrusage): includes pages
    of memory-mapped files (the converters read the safetensors source by positioned reads, not
    through the mapping, so those stay few)."""
    if _PEAK_RESET:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
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


def conversion_parallel(arch: ModelArch, tp: int, pp: int, vpp: int, ep: int = 1, etp: int = 1) -> ParallelConfig:
    """The layout a conversion builds the model at. A mixture-of-experts model with tp > 1 runs
    sequence-parallel in training; the parameters are the same either way, so the converters set it."""
    return ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sequence_parallel=bool(arch.num_experts) and tp > 1)


def expert_tp(arch: ModelArch, tp: int, ep: int, etp: Optional[int]) -> int:
    """--etp when given; else for a mixture-of-experts model the dense layers' tp without expert
    parallelism (what training needs there: aipo_mp.validate) and 1 with it; 1 for a dense model."""
    if etp is not None:
        return etp
    return tp if arch.num_experts and ep == 1 else 1


def conversion_world(tp: int, pp: int, ep: int = 1, etp: int = 1) -> int:
    """Ranks a conversion at this layout needs: the dense mesh (tp x pp x dp) and the expert mesh
    (etp x ep x expert-dp per pipeline stage) over the same ranks, as few as both allow."""
    import math

    return math.lcm(tp, ep * etp) * pp


def check_layout(arch: ModelArch, tp: int, pp: int, vpp: int, ep: int = 1, etp: int = 1) -> None:
    bad = [f"--{k}={v}: must be >= 1" for k, v in (("ep", ep), ("etp", etp)) if v < 1]
    if bad:
        raise ConfigError("; ".join(bad))
    errors = layout_errors(arch, conversion_parallel(arch, tp, pp, vpp, ep, etp))
    if errors:
        text = "; ".join(errors)
        for key in ("tp", "pp", "vpp", "ep", "etp"):
            text = re.sub(rf"parallel\.{key}\b", f"--{key}", text)
        raise ConfigError(text)


def check_weight_files(directory: Path, allow_pickle: bool, pickle_flag: Optional[str] = "--allow-pickle") -> None:
    """Refuse pickled weights (they can run code) before anything loads them. `pickle_flag`: the
    command's flag that allows them (None: the command has none, so none is named)."""
    from aipo_mp.convert.hf_io import check_index_files

    check_index_files(directory)  # shards the index names must all be there
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        if not allow_pickle:
            how = f" or pass {pickle_flag} if you trust the source" if pickle_flag else ""
            raise CheckpointError(
                f"{directory}: holds only pickled .bin weights, which can run code when loaded; convert "
                f"them to safetensors (e.g. save_pretrained(safe_serialization=True)){how}"
            )
        return
    raise CheckpointError(f"{directory}: no *.safetensors weights found")


@dataclass
class HFSource:
    dir: Path
    hf_config: dict
    family: object  # aipo_mp.models.family.Family
    arch: ModelArch
    weights: object  # aipo_mp.convert.hf_io.HFWeights
    dtype: str  # fp32 | bf16 | fp16 ...
    num_params: int
    num_bytes: int


def checked_meta(ckpt: str | Path) -> dict:
    """aipo_checkpoint.json of a Megatron checkpoint, its type and keys checked by the one JSON
    reader first (a list, null, cut file or missing hf_config is one line, not a KeyError)."""
    from aipo_mp.errors import CHECKPOINT_META
    from aipo_mp.models import read_checkpoint_meta_file
    from aipo_mp.training.checkpoint import read_meta

    meta_file = Path(ckpt) / CHECKPOINT_META
    if meta_file.is_file():
        read_checkpoint_meta_file(meta_file)
    return read_meta(ckpt)


def hf_config_and_arch(directory: str | Path):
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"HF directory not found: {d}")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{d} has no config.json; point --hf to a Hugging Face model directory")
    from aipo_mp.convert.hf_io import read_hf_config_file

    hf = read_hf_config_file(cfg_file)
    family = family_for_hf_config(hf)  # unsupported architecture -> ConfigError listing the supported ones
    return hf, family, arch_from_hf_config(hf)


def dropped_on_import(d: Path, family, arch: ModelArch, have: set) -> set:
    """Tensors a family's import skips (DeepSeek-V3's multi-token-prediction layer), with a note."""
    dropped = {n for n in have if family.dropped_on_import and family.dropped_on_import(arch, n)}
    if dropped and os.environ.get("RANK", "0") == "0":
        print(f"note: {d}: {len(dropped)} tensors not imported ({family.notes})", file=sys.stderr, flush=True)
    return dropped


def dropped_names(weights, family, arch: ModelArch) -> list[str]:
    """The tensors of an HF directory that the family's import drops (in stored order)."""
    return [n for n in weights.names() if family.dropped_on_import and family.dropped_on_import(arch, n)]


def expected_hf_shapes(arch: ModelArch, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each HF tensor name of the llama-style families (a family
    with its own table, DeepSeek-V3's latent attention, answers from it)."""
    from aipo_mp.models import get_family

    own = get_family(arch.family).expected_shapes
    if own is not None:
        return own(arch, names)
    h, f, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv, v = arch.num_attention_heads * hd, arch.num_key_value_heads * hd, arch.vocab_size
    table = (
        # Qwen3's per-head q/k norms and Qwen2's q/k/v biases (before the generic "norm.weight").
        ("q_norm.weight", (hd,)), ("k_norm.weight", (hd,)),
        ("q_proj.bias", (q,)), ("k_proj.bias", (kv,)), ("v_proj.bias", (kv,)),
        ("embed_tokens.weight", (v, h)), ("lm_head.weight", (v, h)), ("norm.weight", (h,)), ("layernorm.weight", (h,)),
        ("q_proj.weight", (q, h)), ("k_proj.weight", (kv, h)), ("v_proj.weight", (kv, h)), ("o_proj.weight", (h, q)),
        ("gate_proj.weight", (f, h)), ("up_proj.weight", (f, h)), ("down_proj.weight", (h, f)),
    )
    e, i = arch.num_experts, arch.moe_intermediate_size
    experts = (("gate_proj.weight", (i, h)), ("up_proj.weight", (i, h)), ("down_proj.weight", (h, i)),
               ("w1.weight", (i, h)), ("w3.weight", (i, h)), ("w2.weight", (h, i)))
    out = {}
    for name in names:
        if name.endswith(".gate.weight"):  # an MoE router (Qwen3-MoE mlp.gate, Mixtral block_sparse_moe.gate)
            out[name] = (e, h)
            continue
        for suffix, shape in experts if ".experts." in name else table:
            if name.endswith(suffix):
                out[name] = shape
                break
    return out


def hf_source(directory: str | Path, allow_pickle: bool = False, pickle_flag: Optional[str] = "--allow-pickle"
              ) -> HFSource:
    """Open an HF directory and check it completely (names, and every shape against config.json)
    without reading weights. Every command that reads HF weights (inspect, hf-to-mcore, and
    train's load) opens them here, so a wrong shape is one line before any reshape."""
    from aipo_mp.convert.hf_io import HFWeights

    d = Path(directory)
    hf, family, arch = hf_config_and_arch(d)
    check_weight_files(d, allow_pickle, pickle_flag)
    weights = HFWeights(d, allow_pickle=allow_pickle, pickle_flag=pickle_flag)
    expected = family.hf_names(arch)
    have = set(weights.names())
    ignorable = {n for n in have if IGNORABLE.search(n)}
    ignorable |= dropped_on_import(d, family, arch, have)
    if arch.tie_embeddings and "lm_head.weight" in have:
        ignorable.add("lm_head.weight")  # some exports store the tied copy; the embedding is used
    missing = [n for n in expected if n not in have]
    unexpected = sorted(have - set(expected) - ignorable)
    shape = f"{family.name}, {arch.num_layers} layers" + (f", {arch.num_experts} experts" if arch.num_experts else "")
    if missing:
        # In the fused expert layout, name the fused tensor that lacks (or would hold) them.
        missing = list(dict.fromkeys(weights.stored_name(n) for n in missing))
        # A renamed tensor is both: one line names the two.
        also = f"; unexpected tensors {listing(unexpected)}" if unexpected else ""
        raise CheckpointError(f"{d}: missing tensors {listing(missing)}{also}; the checkpoint is incomplete "
                              f"or does not match its config.json ({shape})")
    if unexpected:
        raise CheckpointError(f"{d}: unexpected tensors {listing(unexpected)}; they do not belong to a "
                              f"{family.name} model as its config.json describes it ({shape}); fix the config or "
                              "the weights")
    shapes = expected_hf_shapes(arch, expected)
    num_params = num_bytes = 0
    dtypes = set()
    for name in expected:
        got = tuple(weights.shape(name))
        want = shapes.get(name)
        if want is not None and got != want:
            stored = weights.stored_name(name)  # gpt-oss: name the fused tensor the slice is of
            what = name if stored == name else f"{stored} (expert slice {name})"
            raise CheckpointError(f"{d}: tensor {what} has shape {got} but config.json implies {want}; "
                              "the weights do not match config.json")
        n = 1
        for s in got:
            n *= s
        dt = weights.dtype(name)
        dtypes.add(dt)
        num_params += n
        num_bytes += n * BYTES_PER.get(dt, 4)
    dtype = sorted(dtypes)[0] if len(dtypes) == 1 else "mixed(" + ",".join(sorted(dtypes)) + ")"
    return HFSource(d, hf, family, arch, weights, dtype, num_params, num_bytes)


def listing(names: list[str], limit: int = 5) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def choose_dtype(requested: Optional[str], source: str, what: str) -> str:
    if requested:
        return requested
    if source in SUPPORTED_DTYPES:
        return source
    raise ConfigError(f"{what} is stored as {source}; pass --dtype bf16 or --dtype fp32")


def setup_parallel(tp: int, pp: int, vpp: int, ep: int = 1, etp: int = 1) -> None:
    from aipo_mp.runtime import platform

    platform.initialize_model_parallel(tp, pp, vpp, ep=ep, etp=etp)
    platform.seed_model_parallel_rng(0)


def build_for_conversion(family, arch: ModelArch, tp: int, pp: int, vpp: int, dtype: str, ep: int = 1,
                         etp: int = 1):
    from aipo_mp.config import PrecisionConfig
    from aipo_mp.models.build import build_model

    # Every weight is overwritten by the conversion: skip megatron's (full-size, per-rank) init.
    built = build_model(family, arch, conversion_parallel(arch, tp, pp, vpp, ep, etp),
                        PrecisionConfig(dtype=dtype, backend="local"), initialize=False)
    assert built.config.perform_initialization is False
    for chunk in built.chunks:
        chunk.eval()
    return built


def rank_stats(**extra) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    return dict(rank=torch.distributed.get_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
                etp_rank=ps.get_expert_tensor_parallel_rank(), peak_rss_bytes=peak_rss_bytes(), **extra)

