"""Block-scaled FP8 weights (DeepSeek-V3/R1, Kimi-K2 releases), dequantized on import.

Such a checkpoint's config.json has `quantization_config: {quant_method: fp8, weight_block_size:
[128, 128], ...}`; each quantized linear stores `X.weight` as float8_e4m3fn and `X.weight_scale_inv`
as fp32, one scale per 128 x 128 block of the weight (a ceil-divided grid: the last block of a dim
that 128 does not divide is partial). The weight is `fp8 value x its block's scale`, computed in
fp32 and rounded once to bf16 - the same numbers transformers' own dequantization gives
(`Fp8Dequantize` in transformers/integrations/finegrained_fp8.py, for the shapes it accepts).

The HF reader presents each such pair as one bf16 tensor under the weight's name (the scale is
not a tensor of the model), dequantized when it is read: one tensor at a time, so the memory of a
conversion stays that of the largest tensor, as for bf16 sources.
"""

from __future__ import annotations

from typing import Optional

import torch

from aipo_mp.errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def fp8_block(hf_config: Optional[dict]) -> Optional[tuple[int, int]]:
    """The weight block of a block-scaled FP8 config.json, None when it is not one."""
    qc = (hf_config or {}).get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"config.json quantization_config.weight_block_size={block!r}: expected two positive "
                              "integers (DeepSeek: [128, 128])")
    return int(block[0]), int(block[1])


def scaled_weights(names, where, stored_dtype) -> dict[str, str]:
    """{weight name: its scale's name} of the stored names. A scale without its weight, or an FP8
    tensor without its scale, is one error line naming it (read unscaled it would be wrong)."""
    stored = set(names)
    pairs = {}
    for scale in sorted(stored):
        if scale.endswith(".weight" + SCALE_SUFFIX):
            weight = scale[:-len(SCALE_SUFFIX)]
            if weight not in stored:
                raise CheckpointError(f"{where}: holds {scale} but not the weight {weight} it scales; the checkpoint "
                                      "is incomplete: copy it again")
            pairs[weight] = scale
    unscaled = sorted(n for n in stored - set(pairs) if stored_dtype(n).startswith("F8"))
    if unscaled:
        raise CheckpointError(f"{where}: FP8 tensor {unscaled[0]} has no {unscaled[0]}{SCALE_SUFFIX} (block scales)"
                              f"{f' (and {len(unscaled) - 1} more)' if len(unscaled) > 1 else ''}; the checkpoint is "
                              "incomplete: copy it again")
    return pairs


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight",
               first_row: int = 0) -> torch.Tensor:
    """bf16 rows of a block-scaled FP8 weight: `weight` holds rows first_row .. first_row + n of
    the full tensor, `scale_inv` the full tensor's [ceil(rows / bm), ceil(cols / bn)] fp32 grid."""
    if weight.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"tensor {name} is {weight.dtype}, but it has a scale ({name}{SCALE_SUFFIX}); block-"
                              "scaled FP8 weights are float8_e4m3fn")
    bm, bn = block
    rows, cols = weight.shape
    want = ((first_row + rows - 1) // bm + 1 if rows else 0, -(-cols // bn))
    grid = tuple(scale_inv.shape)
    if len(grid) != 2 or grid[1] != want[1] or grid[0] < want[0]:
        raise CheckpointError(f"tensor {name}{SCALE_SUFFIX} has shape {grid}, but {name} needs one scale per "
                              f"{bm} x {bn} block; the weights do not match config.json")
    row_block = torch.arange(first_row, first_row + rows) // bm
    scales = scale_inv.to(torch.float32)[row_block].repeat_interleave(bn, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scales).to(torch.bfloat16)


def quantize(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv) as the DeepSeek releases store them (per-block
    max-abs scaled to the FP8 range); for tests and tools that build quantized checkpoints."""
    bm, bn = block
    rows, cols = weight.shape
    grid = (-(-rows // bm), -(-cols // bn))
    padded = torch.zeros(grid[0] * bm, grid[1] * bn, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.reshape(grid[0], bm, grid[1], bn)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / torch.finfo(torch.float8_e4m3fn).max, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.to(torch.float32)


def fp8_block_of(directory) -> Optional[tuple[int, int]]:
    """fp8_block of an HF directory's config.json (None without one, or when it cannot be read:
    the caller's config check names that problem)."""
    from pathlib import Path

    from aipo_mp.errors import UserError
    from aipo_mp.runtime.json_files import read_json_object

    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return None
    try:
        hf = read_json_object(cfg, "config.json")
    except UserError:
        return None
    return fp8_block(hf)
