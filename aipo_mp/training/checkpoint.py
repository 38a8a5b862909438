"""The Megatron checkpoint format of aipo_mp, shared by the trainer and the converters.

A checkpoint directory holds:

- `aipo_checkpoint.json`: {"format": "aipo_mp.megatron.v1", "family", "hf_config" (the HF
  config.json dict the model came from), "layout": {"tp", "pp", "vpp"}, "dtype", "num_params"}
- `model/`: a megatron-core `dist_checkpointing` checkpoint (torch_dist backend). Tensors are
  stored under global keys (layers stacked along a leading axis), so a checkpoint saved at one
  TP/PP/VPP layout loads at any other; dist_checkpointing reshards while loading.
- `hf_extra/`: tokenizer files and generation_config.json copied from the source HF directory.
- `optimizer/` (training checkpoints only): the optimizer's `sharded_state_dict` (megatron's
  distributed optimizer in `fully_reshardable` form: fp32 main weights, Adam moments, step, per
  parameter under the parameter's global key), also a `dist_checkpointing` checkpoint, so a run
  resumes at any TP/PP/VPP/DP layout.
- `manifest.json`: every file with its size and CRC-32 (aipo_mp.training.manifest). Loading
  (train, mcore-to-hf, verify) first checks the files it reads against it, so a damaged file, or
  one copied in from another checkpoint at the same size, is refused by name.

Every collective here runs on a tensor of the default group's device (NCCL serves no CPU tensors),
and both checkpoints are written with megatron's fully-parallel save strategy.

Saving is collective over all ranks and atomic: everything is written into a temporary sibling
(`.<name>.partial`) which rank 0 renames to the final name after every rank has finished.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from aipo_mp.config import ModelArch
from aipo_mp.errors import CHECKPOINT_META as MEGATRON_META
from aipo_mp.errors import CheckpointError
from aipo_mp.models import num_params
from aipo_mp.runtime import platform
from aipo_mp.training import manifest

FORMAT = "aipo_mp.megatron.v1"
MODEL_SUBDIR = "model"
OPTIMIZER_SUBDIR = "optimizer"
# Optimizer state in model space (one tensor per parameter and state, under the parameter's global
# key): reloads at any TP/PP/VPP/DP layout, like the weights.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
EXTRA_SUBDIR = "hf_extra"

# Files of an HF directory that travel with a checkpoint (never weights, never code).
EXTRA_FILE_PATTERNS = (
    "tokenizer*.json", "tokenizer.model", "tokenizer*.txt", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json",
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


DAMAGED_FIX = ("use another checkpoint (an older step of a training run), or restore the file or re-convert the "
               "checkpoint from its source")


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files fail their checksum or do not load: a resuming run falls back past
    it to an older one; every other command stops with the line."""


# ---------------------------------------------------------------------------------------------
# Paths and metadata
# ---------------------------------------------------------------------------------------------


def partial_path(final: str | Path) -> Path:
    """The temporary sibling a checkpoint (or a converted HF directory) is written into."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def is_megatron_checkpoint(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / MEGATRON_META).is_file() and (d / MODEL_SUBDIR).is_dir()


def read_meta(directory: str | Path) -> dict:
    d = Path(directory)
    meta_file = d / MEGATRON_META
    if not meta_file.is_file():
        raise CheckpointError(f"{d} is not an aipo_mp Megatron checkpoint (no {MEGATRON_META}); "
                          "convert an HF directory with `python -m checkpoint_tools hf-to-mcore`")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e.msg} at line {e.lineno}); the checkpoint is damaged")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: format {meta.get('format')!r} is not {FORMAT!r}; "
                          "re-convert the checkpoint with this version of checkpoint_tools")
    if not (d / MODEL_SUBDIR).is_dir():
        raise CheckpointError(f"{d} lacks its {MODEL_SUBDIR}/ directory; the checkpoint is incomplete")
    return meta


def current_layout(built) -> dict:
    from megatron.core import parallel_state as ps

    vpp = getattr(built.config, "virtual_pipeline_model_parallel_size", None) or 1
    layout = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
              "vpp": int(vpp)}
    if built.arch.num_experts:  # mixture of experts: the expert mesh too (informational: loads at any layout)
        layout.update(ep=ps.get_expert_model_parallel_world_size(), etp=ps.get_expert_tensor_parallel_world_size())
    return layout


def dtype_name(built) -> str:
    return DTYPE_NAMES.get(built.config.params_dtype, str(built.config.params_dtype))


ARCH_FIELDS = ("family", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_embeddings", "qkv_bias", "qk_norm", "rope_scaling")


def arch_differences(a: ModelArch, b: ModelArch) -> list[str]:
    return [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in ARCH_FIELDS if getattr(a, f) != getattr(b, f)]


def copy_extra_files(src: Optional[str | Path], dst: Path) -> list[str]:
    """Tokenizer files and generation_config.json of `src` (an HF dir, or a checkpoint's hf_extra/)."""
    dst.mkdir(parents=True, exist_ok=True)
    if not src:
        return []
    src = Path(src)
    if (src / EXTRA_SUBDIR).is_dir():
        src = src / EXTRA_SUBDIR
    copied = []
    for pattern in EXTRA_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.name not in copied:
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


# ---------------------------------------------------------------------------------------------
# Collective helpers
# ---------------------------------------------------------------------------------------------


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def on_rank0_then_agree(fn: Callable[[], object]):
    """Run `fn` on global rank 0 only; every rank learns whether it worked, so a failure on
    rank 0 raises everywhere instead of leaving the other ranks blocked in the next collective."""
    err: Optional[BaseException] = None
    result = None
    if _rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below on rank 0
            err = e
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # On the default group's device: NCCL serves no CPU tensors.
        flag = torch.tensor([1 if err is not None else 0], dtype=torch.int64, device=platform.device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        failed = bool(flag.item())
    else:
        failed = err is not None
    if err is not None:
        raise err
    if failed:
        raise RuntimeError("rank 0 failed while writing the checkpoint (its error is reported there)")
    return result


def prepare_partial(final: Path, overwrite: bool) -> Path:
    """(rank 0, inside on_rank0_then_agree) an empty temporary sibling of `final`."""
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; pass --overwrite or choose another destination")
    tmp = partial_path(final)
    if tmp.exists():  # left by an interrupted earlier attempt: ours to remove
        shutil.rmtree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    return tmp


def publish_partial(final: Path) -> None:
    """(rank 0) rename the temporary sibling to `final`, replacing an existing one."""
    from aipo_mp.runtime.files import replace_directory

    replace_directory(partial_path(final), final)


def remove_partial(final: str | Path) -> None:
    shutil.rmtree(partial_path(final), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def model_sharded_state_dict(built) -> dict:
    """All chunks' sharded state dicts in one dict. Dict keys get a `chunk{i}.` prefix (chunks of
    an interleaved pipeline reuse local layer numbers); the ShardedTensor keys inside stay global
    (megatron offsets each chunk's layers by its pipeline and virtual stage), which is what makes
    the checkpoint layout-independent."""
    merged = {}
    for i, chunk in enumerate(built.chunks):
        for key, value in chunk.sharded_state_dict(prefix="").items():
            merged[f"chunk{i}.{key}"] = value
    return merged


def save_strategy():
    """torch_dist writes with every data-parallel rank writing its share of the replicated
    tensors (megatron's fully-parallel save), instead of DP rank 0 writing them all."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    base = get_default_save_sharded_strategy()
    if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size() == 1:
        return base
    return FullyParallelSaveStrategyWrapper(base, ps.get_data_parallel_group(with_context_parallel=True))


def save_model(built, directory: str | Path, hf_config: dict, extra_files_from: Optional[str | Path] = None,
               dtype: Optional[str] = None, overwrite: bool = True, optimizer=None,
               sharded_save: Optional[Callable[[dict, str], None]] = None) -> Path:
    """Collective over all ranks. Writes `directory` atomically (temporary sibling, renamed by
    rank 0 once every rank is done), with the optimizer's state under optimizer/ when given.
    Returns the final path. `sharded_save(state, path)` replaces `dist_checkpointing.save` for
    the model (the converters' streaming save)."""
    from megatron.core import dist_checkpointing

    final = Path(directory).absolute()
    tmp = partial_path(final)
    use_in_process_results_queue()
    on_rank0_then_agree(lambda: (prepare_partial(final, overwrite) / MODEL_SUBDIR).mkdir())
    try:
        if sharded_save is not None:
            sharded_save(model_sharded_state_dict(built), str(tmp / MODEL_SUBDIR))
        else:
            dist_checkpointing.save(model_sharded_state_dict(built), str(tmp / MODEL_SUBDIR),
                                    sharded_strategy=save_strategy())
        if optimizer is not None:
            on_rank0_then_agree(lambda: (tmp / OPTIMIZER_SUBDIR).mkdir())
            # A fresh model state dict: dist_checkpointing.save consumes the one it was given.
            state = optimizer.sharded_state_dict(model_sharded_state_dict(built), is_loading=False,
                                                 metadata=OPTIMIZER_METADATA)
            dist_checkpointing.save(state, str(tmp / OPTIMIZER_SUBDIR), sharded_strategy=save_strategy())
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        # Read back by the rank that wrote each file, while it is in that node's page cache.
        entries = manifest.collect(tmp)

        def finish():
            meta = {
                "format": FORMAT,
                "family": built.family.name,
                "hf_config": hf_config,
                "layout": current_layout(built),
                "dtype": dtype or dtype_name(built),
                "num_params": num_params(built.arch),
                "arch": dataclasses.asdict(built.arch),
            }
            copy_extra_files(extra_files_from, tmp / EXTRA_SUBDIR)
            (tmp / MEGATRON_META).write_text(json.dumps(meta, indent=2) + "\n")
            for name in manifest.listed_files(tmp):  # what rank 0 just wrote here (small files)
                if name not in entries:
                    entries[name] = ((tmp / name).stat().st_size, manifest.file_crc32(tmp / name))
            manifest.write(tmp, entries)
            publish_partial(final)

        on_rank0_then_agree(finish)
    except BaseException as e:
        # (torch's CheckpointException derives from BaseException, so test what it is not.)
        full = not isinstance(e, (KeyboardInterrupt, SystemExit)) and disk_is_full(tmp)
        if _rank() == 0:
            remove_partial(final)
        if full and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
            # dist_checkpointing's writer processes report a short write, not ENOSPC.
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from e
        raise
    return final


def use_in_process_results_queue() -> None:
    """megatron's torch_dist writer hands its write results to the caller through a queue that
    it creates as a `multiprocessing.Manager().Queue()` (spawn context): one extra server process
    per rank, 1-2 s to start and ~0.4 GB once it unpickles torch objects, left running after the
    save. A synchronous save (the only kind made here: `AsyncRequest.execute_sync`) puts and gets
    in the calling process, so a plain queue serves. Applied only while megatron has not created
    its queue yet; megatron-core 0.16 keeps it in `filesystem_async._results_queue`."""
    import queue

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def disk_is_full(path: Path) -> bool:
    """Whether the filesystem holding `path` is (nearly) out of space: used to name the cause
    when a writer fails with a less direct error."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return False
    return usage.free <= min(16 * 2**20, usage.total // 20)


def check_compatible(built, meta: dict, directory: Path) -> None:
    from aipo_mp.models import arch_from_hf_config

    if meta.get("family") != built.family.name:
        raise CheckpointError(f"{directory} holds a {meta.get('family')} model, not {built.family.name}; "
                          "point to a checkpoint of the configured model")
    diffs = arch_differences(arch_from_hf_config(meta["hf_config"]), built.arch)
    if diffs:
        raise CheckpointError(f"{directory} holds a different {built.family.name} model ({'; '.join(diffs)}; "
                          "checkpoint vs configured); point to a checkpoint of the configured model")


def check_files(directory: Path, under: str) -> None:
    """The files under `under` against the checkpoint's manifest (collective): CheckpointDamaged
    naming the first bad file. A checkpoint without a manifest, or with one older than checksums,
    passes on sizes only."""
    problem = manifest.check(directory, under)
    if problem:
        raise CheckpointDamaged(f"{problem}; {DAMAGED_FIX}")


def load_failure(what: str, where: Path, e: BaseException, hint: str = "") -> CheckpointDamaged:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointDamaged(f"{where}: cannot load {what} ({type(e).__name__}: {first[:300]}); the checkpoint is "
                             f"incomplete or damaged{hint}; {DAMAGED_FIX}")


def load_model(built, directory: str | Path, verify: bool = True) -> dict:
    """Load the weights of an aipo_mp checkpoint into this rank's chunks, at any layout
    (collective). Tensors of another dtype are cast to the model's. Returns the metadata.
    `verify`: check the model files against the manifest first (off when the caller did)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    d = Path(directory)
    meta = read_meta(d)
    check_compatible(built, meta, d)
    if verify:
        check_files(d, MODEL_SUBDIR + "/")
    sharded = model_sharded_state_dict(built)
    try:
        loaded = dist_checkpointing.load(sharded, str(d / MODEL_SUBDIR), strict=StrictHandling.RAISE_ALL)
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise load_failure("the model weights", d / MODEL_SUBDIR, e) from e
    for i, chunk in enumerate(built.chunks):
        prefix = f"chunk{i}."
        state = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
        chunk.load_state_dict(state, strict=True)
    return meta


def load_optimizer(optimizer, built, directory: str | Path, verify: bool = True) -> None:
    """Load the optimizer state of an aipo_mp training checkpoint into `optimizer` (built over
    `built`'s chunks) at this run's layout, resharded from the saved one (collective)."""
    from megatron.core import dist_checkpointing

    d = Path(directory) / OPTIMIZER_SUBDIR
    if not d.is_dir():
        raise CheckpointError(f"{directory} holds no optimizer state ({OPTIMIZER_SUBDIR}/ missing): it is a weights-only "
                          f"checkpoint; start a new run from it with model.path={directory}")
    if verify:
        check_files(Path(directory), OPTIMIZER_SUBDIR + "/")
    sharded = optimizer.sharded_state_dict(model_sharded_state_dict(built), is_loading=True,
                                           metadata=OPTIMIZER_METADATA)
    try:
        loaded = dist_checkpointing.load(sharded, str(d))
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise load_failure("the optimizer state", d, e, " (or was saved with other optimizer settings)") from e
    optimizer.load_state_dict(loaded)


def prune_checkpoints(root: str | Path, keep: int, latest_name: str = "latest") -> list[Path]:
    """Delete all but the newest `keep` step_* checkpoints under `root` (keep <= 0: keep all).
    The one `latest` names is never deleted. Returns the deleted directories."""
    root = Path(root)
    if keep <= 0 or not root.is_dir():
        return []
    latest_file = root / latest_name
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    doomed = [p for p in steps[:-keep] if p.name != latest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
