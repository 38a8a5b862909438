"""Shared weight I/O: bounded safetensors shards with an index, and the finishing of an HF
directory (names, index, config, tokenizer files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from checkpoint_tools.common import INDEX


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

