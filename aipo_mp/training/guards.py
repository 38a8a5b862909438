"""Stop training on a non-finite number instead of saving NaN weights.

A non-finite gradient norm is caught before the optimizer step, and a non-finite loss before the
step is logged or saved, so nothing from the failing step reaches disk. Every rank sees the same
all-reduced numbers, so every rank stops at the same point."""

from __future__ import annotations

import math

import torch

from aipo_mp.errors import NonFiniteError


def check_step(step: int, what: str, value: float) -> None:
    """`step` is 1-based (as in metrics.jsonl)."""
    if not math.isfinite(value):
        raise NonFiniteError(f"step {step}: {what} is {value}; stopped without saving this step. Check the starting "
                             "weights (model.path) for NaN/inf, or lower train.lr; the last checkpoint is intact")


def check_reference(table: torch.Tensor) -> None:
    bad = int((~torch.isfinite(table)).any(dim=1).sum())
    if bad:
        raise NonFiniteError(f"reference log-probs of {bad} of {table.shape[0]} pairs are NaN or inf: the reference "
                             "weights (model.path, or reference.path) contain NaN/inf; use a valid checkpoint")
