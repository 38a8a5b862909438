"""The converters' HF reader on a fused mixture-of-experts directory (transformers 5's layout,
written here with safetensors): per-expert names, each the right rows of the fused tensor, through
`HFWeights.get`, `SafetensorsSource.read_into` (whole rows, column slices, casts, a buffer smaller
than one tensor) and `view`."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_arch


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory):
    from safetensors.torch import save_file

    from aipo_mp.models import hf_config_for

    arch = tiny_arch("mixtral")
    e, i, h = arch.num_experts, arch.moe_intermediate_size, arch.hidden_size
    g = torch.Generator().manual_seed(0)
    tensors = {"model.layers.1.mlp.experts.gate_up_proj": torch.randn(e, 2 * i, h, generator=g),
               "model.layers.1.mlp.experts.down_proj": torch.randn(e, h, i, generator=g),
               "model.layers.1.mlp.gate.weight": torch.randn(e, h, generator=g),
               "model.norm.weight": torch.randn(h, generator=g)}
    d = tmp_path_factory.mktemp("fused")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config_for(arch)))
    return d, tensors, arch


def expected(tensors, arch) -> dict:
    i = arch.moe_intermediate_size
    gate_up, down = tensors["model.layers.1.mlp.experts.gate_up_proj"], tensors["model.layers.1.mlp.experts.down_proj"]
    out = {"model.layers.1.block_sparse_moe.gate.weight": tensors["model.layers.1.mlp.gate.weight"],
           "model.norm.weight": tensors["model.norm.weight"]}
    for j in range(arch.num_experts):
        p = f"model.layers.1.block_sparse_moe.experts.{j}."
        out[p + "w1.weight"], out[p + "w3.weight"], out[p + "w2.weight"] = gate_up[j, :i], gate_up[j, i:], down[j]
    return out


def test_fused_experts_are_presented_per_expert(fused_dir):
    from aipo_mp.convert.hf_io import HFWeights

    d, tensors, arch = fused_dir
    w, want = HFWeights(d), expected(tensors, arch)
    assert sorted(w.names()) == sorted(want)
    for name, t in want.items():
        assert w.shape(name) == tuple(t.shape) and w.dtype(name) == "fp32"
        assert torch.equal(w.get(name), t), name
    assert w.stored_name("model.layers.1.block_sparse_moe.experts.2.w3.weight") == "model.layers.1.mlp.experts.gate_up_proj"
    assert w.stored_name("model.layers.1.block_sparse_moe.gate.weight") == "model.layers.1.mlp.gate.weight"


def test_source_reads_rows_columns_and_casts_of_virtual_tensors(fused_dir):
    from aipo_mp.convert.hf_io import HFWeights
    from aipo_mp.convert.tensor_io import SafetensorsSource

    d, tensors, arch = fused_dir
    src, want = SafetensorsSource(HFWeights(d)), expected(tensors, arch)
    src.CHUNK_BYTES = 1000  # a buffer of a few rows: the chunked path runs several times per tensor
    for name in ("model.layers.1.block_sparse_moe.experts.2.w3.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight"):
        t = want[name]
        assert torch.equal(src.view(name), t)
        rows = torch.empty(5, t.shape[1])
        assert src.read_into(rows, name, 7) and torch.equal(rows, t[7:12])  # one positioned read
        cols = torch.empty(t.shape[0] - 3, 16)
        assert src.read_into(cols, name, 3, (16, 32)) and torch.equal(cols, t[3:, 16:32])
        half = torch.empty(t.shape, dtype=torch.bfloat16)
        assert src.read_into(half, name, 0) and torch.equal(half, t.to(torch.bfloat16))
