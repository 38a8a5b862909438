"""Hugging Face weight directories: lazy safetensors reading (only the tensors asked for) and
sharded writing with an index, as transformers and vLLM expect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from aipo_mp.errors import CheckpointError

INDEX = "model.safetensors.index.json"


class HFWeights:
    """name -> tensor over the safetensors files of an HF directory, opened lazily."""

    def __init__(self, directory: str | Path, allow_pickle: bool = False, pickle_flag: Optional[str] = "--allow-pickle"):
        self.dir = Path(directory)
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.files = self._index()
        if not self.files:
            bins = sorted(self.dir.glob("*.bin"))
            if not bins:
                raise CheckpointError(f"{self.dir}: no *.safetensors weights found")
            if not allow_pickle:
                how = f" or pass {pickle_flag} if you trust the source" if pickle_flag else ""
                raise CheckpointError(
                    f"{self.dir}: holds only pickled .bin weights, which can run code when loaded; "
                    f"convert them to safetensors (e.g. save_pretrained(safe_serialization=True)){how}"
                )
            self._pickled = {}
            for b in bins:  # weights_only refuses arbitrary objects
                self._pickled.update(torch.load(b, map_location="cpu", weights_only=True))
            self.files = {n: "" for n in self._pickled}

    def _index(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.exists():
            return check_index_files(self.dir)
        files = sorted(self.dir.glob("*.safetensors"))
        out = {}

        for f in files:
            with open_safetensors(f) as h:
                out.update({k: f.name for k in h.keys()})
        return out

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = open_safetensors(self.dir / fname)
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        if self._pickled is not None:
            if name not in self._pickled:
                raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint")
            return self._pickled[name]
        if name not in self.files:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        try:
            return self._handle(self.files[name]).get_tensor(name)
        except Exception as e:  # safetensors raises its own error type for bytes past the end
            raise CheckpointError(f"{self.dir / self.files[name]}: cannot read tensor {name} ({first_line(e)}); the file "
                              "is truncated or damaged: copy or convert it again") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())


def check_index_files(directory: str | Path) -> dict[str, str]:
    """The index's tensor -> file map, once every file it names exists (one line naming the
    missing ones otherwise). {} when the directory has no index."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.exists():
        return {}
    try:
        weight_map = dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({first_line(e)}); re-save the model") from None
    missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing:
        raise CheckpointError(f"{index} names {len(missing)} missing file(s): {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}; the model directory is incomplete: copy every shard")
    return weight_map


def open_safetensors(path: Path):
    """safe_open with one clear line for a truncated or damaged file (its header promises more
    bytes than the file holds, or it is not safetensors at all)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (named by {INDEX}); the checkpoint is incomplete") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)}); the file is truncated or "
                          "damaged: copy or convert it again") from None
    check_safetensors_size(path, handle)
    return handle


def check_safetensors_size(path: Path, handle) -> None:
    """safetensors maps the file lazily, so a file cut in the middle opens fine and fails (or
    reads garbage) at the first tensor past the cut: compare the header's end offset with the size."""
    import struct

    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    actual = path.stat().st_size
    if actual < expected:
        raise CheckpointError(f"{path}: truncated ({actual} bytes, its header describes {expected}); copy or convert "
                          "it again")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False, what: str = "model.path"):
    """AutoTokenizer of a local directory, with one clear line when it has none (transformers
    otherwise suggests installing sentencepiece, which is not the problem)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{what}={directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); copy the "
                          "model's tokenizer into that directory")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{what}={directory}: the tokenizer does not load ({first_line(e)}); fix or replace its "
                          "tokenizer files") from None


def check_tensor_names(weights: HFWeights, expected: Iterable[str]) -> None:
    expected = list(expected)
    have = set(weights.names())
    missing = [n for n in expected if n not in have]
    unexpected = sorted(have - set(expected))
    if missing:
        raise CheckpointError(f"{weights.dir}: missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{weights.dir}: unexpected tensors: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
