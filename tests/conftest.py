"""Shared fixtures: tiny random-weight HF models of each family, built locally once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "mistral", "gemma2")
# The families users run today, by tiny config name (configs/models/tiny_NAME.yaml): Llama-3.1
# with llama3 RoPE scaling, Qwen2.5 (q/k/v biases, tied embeddings), Qwen3 (q/k norms).
NEW_MODELS = ("llama3_1", "qwen2", "qwen3")
# Mixtures of experts (4 experts, top-2): Qwen3-MoE (with one dense layer) and Mixtral.
MOE_MODELS = ("qwen3_moe", "mixtral")

os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_arch(name: str):
    """The architecture of configs/models/tiny_NAME.yaml (NAME: a family or one of NEW_MODELS)."""
    from aipo_mp.config import load_config

    return load_config(ROOT / "configs" / "models" / f"tiny_{name}.yaml").model.arch


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    from aipo_mp.testing.hf_build import save_hf_model

    base = tmp_path_factory.mktemp("tiny_hf")
    return {f: save_hf_model(tiny_arch(f), base / f, seed=11) for f in FAMILIES + NEW_MODELS + MOE_MODELS}
