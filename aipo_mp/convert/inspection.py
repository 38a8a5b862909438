"""inspect: family, layout, dtype, parameter count and bytes of an HF directory or a Megatron checkpoint."""

from __future__ import annotations

from pathlib import Path

from aipo_mp.config import ModelArch
from aipo_mp.convert.common import checked_meta, hf_source, human_bytes, human_count
from aipo_mp.errors import CheckpointError, ConfigError
from aipo_mp.models import num_params


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def megatron_tensor_count(model_dir: Path) -> int:
    """Parameters stored in a dist_checkpointing torch_dist checkpoint (from its .metadata)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(str(model_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint is a user-facing condition
        raise CheckpointError(f"{model_dir}: cannot read the checkpoint metadata ({type(e).__name__}: {e}); "
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
    from aipo_mp.models import arch_from_hf_config, family_for_hf_config
    from aipo_mp.training.checkpoint import is_megatron_checkpoint

    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"not a directory: {d}")
    if is_megatron_checkpoint(d):
        meta = checked_meta(d)
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
                layout=None, dtype=src.dtype, num_params=src.num_params, num_params_config=num_params(src.arch),
                bytes=files_bytes, arch=shape_summary(src.arch),
                **({"expert_layout": "fused" if src.weights.virtual else "per-expert"} if src.arch.num_experts else {}))


def shape_summary(arch: ModelArch) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "tie_embeddings")
    if arch.num_experts:
        keys += ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "dense_layers")
    return {k: getattr(arch, k) for k in keys}


def format_inspect(info: dict) -> str:
    a = info["arch"]
    lay = info["layout"]
    layout = f"tp={lay['tp']} pp={lay['pp']} vpp={lay.get('vpp', 1)}" if lay else "none (Hugging Face, unsharded)"
    if lay and "ep" in lay:
        layout += f" ep={lay['ep']} etp={lay.get('etp', 1)}"
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
    if a.get("num_experts"):
        layout_note = f", {info['expert_layout']} tensors" if info.get("expert_layout") else ""
        dense = f", dense layers {a['dense_layers']}" if a["dense_layers"] else ""
        lines.append(f"experts:     {a['num_experts']} per MoE layer, top-{a['num_experts_per_tok']}, ffn "
                     f"{a['moe_intermediate_size']}{dense}{layout_note}")
    if info["num_params"] != info["num_params_config"]:
        lines.append(f"warning:     config implies {info['num_params_config']:,} parameters")
    return "\n".join(lines)

