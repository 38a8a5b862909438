"""Shared fixtures: tiny random-weight HF models of each family, built locally once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "mistral", "gemma2")

os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_arch(family: str):
    from aipo_mp.config import load_config

    return load_config(ROOT / "configs" / "models" / f"tiny_{family}.yaml").model.arch


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    from aipo_mp.models.hf_build import save_hf_model

    base = tmp_path_factory.mktemp("tiny_hf")
    return {f: save_hf_model(tiny_arch(f), base / f, seed=11) for f in FAMILIES}
