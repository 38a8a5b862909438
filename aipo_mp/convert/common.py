"""What every checkpoint_tools command shares: sizes and their printing, memory sampling,
the checks that need no process group (every user mistake becomes a one-line `ConfigError` before
any process starts or any byte is written), the HF source check, and the per-rank model setup."""

from __future__ import annotations

import errno
import json
import re
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aipo_mp.config import ModelArch, ParallelConfig
from aipo_mp.errors import CheckpointError, ConfigError
from aipo_mp.validate import layout_errors

# torch (and megatron) are imported inside the functions, so importing this package is cheap:
# usage errors answer at once, and any `spawn`ed helper process re-importing it stays light.


SUPPORTED_DTYPES = ("bf16", "fp32")


SAFETENSORS_DTYPES = {"BF16": "bf16", "F32": "fp32", "F16": "fp16", "F64": "fp64"}


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
    from aipo_mp.convert.hf_io import check_index_files

    check_index_files(directory)  # shards the index names must all be there
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        if not allow_pickle:
            raise CheckpointError(
                f"{directory}: holds only pickled .bin weights, which can run code when loaded; convert "
                "them to safetensors or pass --allow-pickle if you trust the source"
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


def hf_config_and_arch(directory: str | Path):
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"HF directory not found: {d}")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{d} has no config.json; point --hf to a Hugging Face model directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})")
    family = family_for_hf_config(hf)  # unsupported architecture -> ConfigError listing the supported ones
    return hf, family, arch_from_hf_config(hf)


def expected_hf_shapes(arch: ModelArch, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each HF tensor name of the llama-style families."""
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


def tensor_dtype(weights, name: str) -> str:
    if weights._pickled is not None:
        return str(weights._pickled[name].dtype).replace("torch.", "").replace("float32", "fp32").replace(
            "bfloat16", "bf16").replace("float16", "fp16")
    raw = weights._handle(weights.files[name]).get_slice(name).get_dtype()
    return SAFETENSORS_DTYPES.get(raw, raw.lower())


def hf_source(directory: str | Path, allow_pickle: bool = False) -> HFSource:
    """Open an HF directory and check it completely (names, shapes) without reading weights."""
    from aipo_mp.convert.hf_io import HFWeights

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
        raise CheckpointError(f"{d}: missing tensors {', '.join(missing[:5])}{more}; the checkpoint is incomplete "
                          f"or does not match its config.json ({family.name}, {arch.num_layers} layers)")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{d}: unexpected tensors {', '.join(unexpected[:5])}{more}; they do not belong to a "
                          f"{family.name} model as its config.json describes it; fix the config or the weights")
    shapes = expected_hf_shapes(arch, expected)
    num_params = num_bytes = 0
    dtypes = set()
    for name in expected:
        got = tuple(weights.shape(name))
        want = shapes.get(name)
        if want is not None and got != want:
            raise CheckpointError(f"{d}: tensor {name} has shape {got} but config.json implies {want}; "
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


def setup_parallel(tp: int, pp: int, vpp: int) -> None:
    from aipo_mp.runtime import platform

    platform.initialize_model_parallel(tp, pp, vpp)
    platform.seed_model_parallel_rng(0)


def build_for_conversion(family, arch: ModelArch, tp: int, pp: int, vpp: int, dtype: str):
    from aipo_mp.config import PrecisionConfig
    from aipo_mp.models.build import build_model

    # Every weight is overwritten by the conversion: skip megatron's (full-size, per-rank) init.
    built = build_model(family, arch, ParallelConfig(tp=tp, pp=pp, vpp=vpp),
                        PrecisionConfig(dtype=dtype, backend="local"), initialize=False)
    assert built.config.perform_initialization is False
    for chunk in built.chunks:
        chunk.eval()
    return built


def rank_stats(**extra) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    return dict(rank=torch.distributed.get_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(), peak_rss_bytes=peak_rss_bytes(), **extra)

