"""Hugging Face weight directories: lazy safetensors reading (only the tensors asked for) and
sharded writing with an index, as transformers and vLLM expect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from aipo_mp.config import ConfigError

INDEX = "model.safetensors.index.json"


class HFWeights:
    """name -> tensor over the safetensors files of an HF directory, opened lazily."""

    def __init__(self, directory: str | Path, allow_pickle: bool = False):
        self.dir = Path(directory)
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.files = self._index()
        if not self.files:
            bins = sorted(self.dir.glob("*.bin"))
            if not bins:
                raise ConfigError(f"{self.dir}: no *.safetensors weights found")
            if not allow_pickle:
                raise ConfigError(
                    f"{self.dir}: holds only pickled .bin weights, which can run code when loaded; "
                    "convert them to safetensors or pass --allow-pickle if you trust the source"
                )
            self._pickled = {}
            for b in bins:  # weights_only refuses arbitrary objects
                self._pickled.update(torch.load(b, map_location="cpu", weights_only=True))
            self.files = {n: "" for n in self._pickled}

    def _index(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(self.dir.glob("*.safetensors"))
        out = {}
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f.name for k in h.keys()})
        return out

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, fname: str):
        from safetensors import safe_open

        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.dir / fname), framework="pt")
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        if self._pickled is not None:
            if name not in self._pickled:
                raise ConfigError(f"{self.dir}: tensor {name} is missing from the checkpoint")
            return self._pickled[name]
        if name not in self.files:
            raise ConfigError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        return self._handle(self.files[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())


def check_tensor_names(weights: HFWeights, expected: Iterable[str]) -> None:
    expected = list(expected)
    have = set(weights.names())
    missing = [n for n in expected if n not in have]
    unexpected = sorted(have - set(expected))
    if missing:
        raise ConfigError(f"{weights.dir}: missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        raise ConfigError(f"{weights.dir}: unexpected tensors: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
