"""Where the rows of a Megatron tensor come from in the HF tensors, derived from a mapping
rule (`aipo_mp.models.family.Rule`: its transform and its tensor-parallel split).

A rule's Megatron tensor, on TP rank `rank` of `size`, is a stack of row blocks, each a run of
rows of one HF tensor (for a row-parallel split, a column range of it). Both directions use this
one description: hf-to-mcore copies each block from the HF file into the Megatron shard being
written, mcore-to-hf copies each block of the stored (global, size 1) tensor into its HF tensor.
The description agrees with `to_megatron` / `tp_slice` of aipo_mp.models.build (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from aipo_mp.config import ModelArch
from aipo_mp.errors import ConfigError
from aipo_mp.models.family import COPY, GLU, NONE, QKV, ROW, Rule


@dataclass(frozen=True)
class Block:
    dst: int  # first row in the Megatron tensor
    n: int  # number of rows
    hf_name: str
    src: int  # first row in the HF tensor
    cols: Optional[tuple[int, int]] = None  # column range of the HF tensor (row-parallel split)


def row_blocks(rule: Rule, index: dict, arch: ModelArch, rank: int, size: int,
               hf_shape: Callable[[str], tuple[int, ...]]) -> list[Block]:
    """The blocks of this TP rank's Megatron tensor of `rule` at `index` ({"i": layer, "e": expert}
    as the rule has them; size 1: the whole tensor)."""
    names = rule.hf_at(index)
    if rule.split == NONE:
        rank, size = 0, 1
    if rule.transform == COPY:
        shape = hf_shape(names[0])
        if rule.split == ROW:
            cols = _even_part(shape[1], rank, size, names[0], 1)
            return [Block(0, shape[0], names[0], 0, cols)]
        start, stop = _even_part(shape[0], rank, size, names[0], 0)
        return [Block(0, stop - start, names[0], start)]
    if rule.transform == GLU:
        gate, up = names
        start, stop = _even_part(hf_shape(gate)[0], rank, size, gate, 0)
        n = stop - start
        return [Block(0, n, gate, start), Block(n, n, up, start)]
    if rule.transform == QKV:
        q, k, v = names
        ng, hd = arch.num_key_value_heads, arch.head_dim
        qpg = arch.num_attention_heads // ng * hd
        if ng % size:
            raise ConfigError(f"tp={size} does not divide the {ng} query groups")
        local, blocks = ng // size, []
        for g in range(local):
            group, base = rank * local + g, g * (qpg + 2 * hd)
            blocks += [Block(base, qpg, q, group * qpg), Block(base + qpg, hd, k, group * hd),
                       Block(base + qpg + hd, hd, v, group * hd)]
        return blocks
    raise ValueError(f"unknown transform {rule.transform!r}")


def _even_part(full: int, rank: int, size: int, name: str, dim: int) -> tuple[int, int]:
    if full % size:
        raise ConfigError(f"tensor {name} dimension {dim} ({full}) is not divisible by tp={size}; choose another --tp")
    step = full // size
    return rank * step, (rank + 1) * step


def hf_rows(blocks: list[Block], name: str) -> list[Block]:
    return [b for b in blocks if b.hf_name == name]


LAYER_PREFIX, EXPERT_PART = "decoder.layers.{i}.", "local_experts.{e}."


def checkpoint_key(megatron_name: str, index: dict, arch: ModelArch,
                   stacked_layers: bool = True) -> tuple[str, tuple[int, ...]]:
    """The key under which dist_checkpointing stores a rule's tensor at `index`, and the tensor's
    position on the key's leading stacked axes.

    Layers: megatron stacks them along a leading axis (`decoder.layers.{i}.input_layernorm.weight`
    -> `decoder.layers.self_attention.linear_qkv.layer_norm_weight`, position (i,), by the layer
    spec's keys map) unless the block is not homogeneous, which a mixture-of-experts model's
    `moe_layer_freq` list always makes it: then each layer has its own key
    (`decoder.layers.3.self_attention.linear_qkv.layer_norm_weight`, no position).
    Experts: SequentialMLP (and TE's grouped GEMM, whose keys are the same) stacks a layer's
    experts along the next axis: `...mlp.experts.local_experts.{e}.linear_fc1.weight` ->
    `...mlp.experts.experts.linear_fc1.weight`, position (..., e). MoE layers keep their
    `pre_mlp_layernorm` name (the keys map renames it only for dense layers)."""
    from aipo_mp.models.family import CHECKPOINT_KEYS_MAP

    if not megatron_name.startswith(LAYER_PREFIX):
        return megatron_name, ()
    rest = megatron_name[len(LAYER_PREFIX):]
    moe_layer = bool(arch.num_experts) and index["i"] not in arch.dense_layers
    for old, new in CHECKPOINT_KEYS_MAP.items():
        if rest.startswith(old) and not (moe_layer and old == "pre_mlp_layernorm."):
            rest = new + rest[len(old):]
            break
    head, prefix = ("decoder.layers.", (index["i"],)) if stacked_layers else (f"decoder.layers.{index['i']}.", ())
    if EXPERT_PART in rest:
        return head + rest.replace(EXPERT_PART, "experts."), (*prefix, index["e"])
    return head + rest, prefix


def layers_stacked(keys) -> bool:
    """Whether a checkpoint's layers share keys (stacked) or each has its own (`decoder.layers.N.`)."""
    return not any(k.startswith("decoder.layers.") and k.split(".")[2].isdigit() for k in keys)
