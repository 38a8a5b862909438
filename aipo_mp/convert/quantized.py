"""Quantized release formats, dequantized to bf16 on import: block-scaled FP8 weights
(DeepSeek-V3/R1, Kimi-K2 releases) and MXFP4 expert weights (gpt-oss releases).

FP8.

Such a checkpoint's config.json has `quantization_config: {quant_method: fp8, weight_block_size:
[128, 128], ...}`; each quantized linear stores `X.weight` as float8_e4m3fn and `X.weight_scale_inv`
as fp32, one scale per 128 x 128 block of the weight (a ceil-divided grid: the last block of a dim
that 128 does not divide is partial). The weight is `fp8 value x its block's scale`, computed in
fp32 and rounded once to bf16 - the same numbers transformers' own dequantization gives
(`Fp8Dequantize` in transformers/integrations/finegrained_fp8.py, for the shapes it accepts).

The HF reader presents each such pair as one bf16 tensor under the weight's name (the scale is
not a tensor of the model), dequantized when it is read: one tensor at a time, so the memory of a
conversion stays that of the largest tensor, as for bf16 sources.

MXFP4. Such a checkpoint's config.json has `quantization_config: {quant_method: mxfp4, ...}`; a
quantized fused expert tensor `X` ([experts, cols, rows] in memory, e.g. gpt-oss's
`mlp.experts.gate_up_proj` [E, hidden, 2 x intermediate]) is stored as two uint8 tensors:
`X_blocks` [E, rows, cols / 32, 16] (two 4-bit E2M1 codes a byte, low nibble first, 32 values a
block) and `X_scales` [E, rows, cols / 32] (one E8M0 power-of-two exponent a block, bias 127).
A value is `FP4_VALUES[code] x 2^(scale - 127)`, computed in fp32 (exact: a 4-bit value times a
power of two) and rounded once to bf16, and the [E, rows, cols] result is transposed to
[E, cols, rows]: the numbers and the layout transformers' own dequantization gives
(`convert_moe_packed_tensors` in transformers/integrations/mxfp4.py), bit for bit.

The HF reader presents each `X_blocks` / `X_scales` pair as one bf16 tensor `X`. Its experts are
dequantized when they are read, one expert at a time, so a
conversion rank that reads only its experts holds one expert's weights at a time, never the
layer's fused tensor (aipo_mp.convert.hf_io.HFWeights.mxfp4_rows).
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
    return fp8_block(_config_of(directory))


def _config_of(directory) -> Optional[dict]:
    from pathlib import Path

    from aipo_mp.errors import UserError
    from aipo_mp.runtime.json_files import read_json_object

    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return read_json_object(cfg, "config.json")
    except UserError:
        return None


# -- MXFP4 (gpt-oss) ----------------------------------------------------------------------------

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
MXFP4_BLOCK = 32  # values per block (one shared scale); 16 bytes of two 4-bit codes
SCALE_BIAS = 127  # E8M0: the stored byte is the exponent + 127
# E2M1 code -> value (sign bit 3, two exponent bits, one mantissa bit).
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(hf_config: Optional[dict]) -> bool:
    """Whether config.json says the experts are stored as MXFP4 blocks and scales."""
    return ((hf_config or {}).get("quantization_config") or {}).get("quant_method") == "mxfp4"


def mxfp4_shape(blocks_shape) -> tuple[int, ...]:
    """The dequantized [E, cols, rows] shape of an [E, rows, cols / 32, 16] blocks tensor."""
    e, rows, groups, _ = blocks_shape
    return (e, groups * MXFP4_BLOCK, rows)


def mxfp4_pairs(names, where, stored_shape, stored_dtype) -> dict[str, tuple[str, str]]:
    """{presented name X: (X_blocks, X_scales)} of the stored names. A blocks tensor without its
    scales (or the reverse), a dtype other than uint8, or shapes that do not pair up is one error
    line naming the tensor (read any other way the weights would be wrong)."""
    stored = set(names)
    pairs = {}
    for blocks in sorted(n for n in stored if n.endswith(BLOCKS_SUFFIX)):
        name = blocks[:-len(BLOCKS_SUFFIX)]
        scales = name + SCALES_SUFFIX
        if scales not in stored:
            raise CheckpointError(f"{where}: MXFP4 tensor {blocks} has no {scales} (its block exponents); the "
                                  "checkpoint is incomplete: copy it again")
        check_mxfp4_shapes(name, stored_shape(blocks), stored_shape(scales), stored_dtype(blocks),
                           stored_dtype(scales), where)
        if name in stored:
            raise CheckpointError(f"{where}: holds both {name} and its MXFP4 blocks {blocks}; keep one: copy the "
                                  "checkpoint again")
        pairs[name] = (blocks, scales)
    orphans = sorted(n for n in stored if n.endswith(SCALES_SUFFIX) and n[:-len(SCALES_SUFFIX)] not in pairs)
    if orphans:
        blocks = orphans[0][:-len(SCALES_SUFFIX)] + BLOCKS_SUFFIX
        raise CheckpointError(f"{where}: holds {orphans[0]} but not the MXFP4 blocks {blocks} it scales; the "
                              "checkpoint is incomplete: copy it again")
    return pairs


def check_mxfp4_shapes(name: str, blocks_shape, scales_shape, blocks_dtype: str, scales_dtype: str, where) -> None:
    """One error line naming the tensor unless blocks are uint8 [E, rows, groups, 16] and scales
    uint8 [E, rows, groups]."""
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    for suffix, dtype in ((BLOCKS_SUFFIX, blocks_dtype), (SCALES_SUFFIX, scales_dtype)):
        if dtype not in ("U8", "uint8", str(torch.uint8)):
            raise CheckpointError(f"{where}: MXFP4 tensor {name}{suffix} is {dtype}, expected uint8 (bytes of 4-bit "
                                  "codes, or E8M0 exponents); the weights do not match config.json's mxfp4 "
                                  "quantization_config")
    if len(blocks_shape) != 4 or blocks_shape[-1] != MXFP4_BLOCK // 2:
        raise CheckpointError(f"{where}: MXFP4 tensor {name}{BLOCKS_SUFFIX} has shape {blocks_shape}, expected "
                              f"[experts, rows, blocks, {MXFP4_BLOCK // 2}]; the weights do not match config.json's "
                              "mxfp4 quantization_config")
    if scales_shape != blocks_shape[:-1]:
        raise CheckpointError(f"{where}: MXFP4 tensor {name}{SCALES_SUFFIX} has shape {scales_shape}, but "
                              f"{name}{BLOCKS_SUFFIX} {blocks_shape} needs one scale per block: "
                              f"{blocks_shape[:-1]}; the checkpoint is damaged: copy it again")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, name: str = "tensor",
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[E, cols, rows] values of MXFP4 `blocks` [E, rows, cols / 32, 16] and `scales` [E, rows,
    cols / 32] (uint8 both): each code's value times its block's 2^(scale - 127), in fp32, then
    rounded to `dtype`. Pass a few experts at a time to bound the memory (temporaries of about
    8 bytes per value: one gpt-oss-120b expert, 16.6 M values, measured +129 MiB peak RSS)."""
    check_mxfp4_shapes(name, blocks.shape, scales.shape, str(blocks.dtype), str(scales.dtype), "MXFP4")
    # Two values a byte, the low nibble first: one lookup of the byte in a 256 x 2 table gives
    # [E, rows, groups, 16, 2] -> [E, rows, groups, 32].
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)
    e, rows, groups, _ = blocks.shape
    values = pairs[blocks.to(torch.int64)].reshape(e, rows, groups, MXFP4_BLOCK)
    values = torch.ldexp(values, scales.to(torch.int32).sub_(SCALE_BIAS).unsqueeze(-1))
    return values.reshape(e, rows, groups * MXFP4_BLOCK).transpose(1, 2).to(dtype).contiguous()


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of an [E, cols, rows] weight as the gpt-oss releases store them: per block
    of 32 values along cols, the smallest power of two that brings the max-abs within 6, each
    value rounded to the nearest E2M1 code; for tests and tools that build quantized checkpoints."""
    w = weight.float().transpose(1, 2)  # [E, rows, cols]
    e, rows, cols = w.shape
    if cols % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs cols divisible by {MXFP4_BLOCK}, got {cols}")
    g = w.reshape(e, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = g.abs().amax(dim=-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127).to(torch.int32)
    scaled = torch.ldexp(g, -exp.unsqueeze(-1))
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)  # nearest code (+0 before -0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return blocks, (exp + SCALE_BIAS).to(torch.uint8)


def mxfp4_of(directory) -> bool:
    """is_mxfp4 of an HF directory's config.json (False without one, or when it cannot be read:
    the caller's config check names that problem)."""
    return is_mxfp4(_config_of(directory))
