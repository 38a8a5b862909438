"""The trainer's handoff (aipo_mp.convert.handoff) of mixture-of-experts policies: the tiny
Qwen3-MoE (one dense layer) and Mixtral (4 experts, top-2) built at a layout, loaded from their HF
directories and written back as the trainer does at the end of a round, equal the source
directories bit for bit, every HF tensor once (per-expert names, as vLLM loads them), at EP2
(2 ranks), and on 4 ranks at TP2 x EP2 x ETP2 with sequence parallelism, TP2 x EP2 (ETP 1: the
experts of an EP rank have an expert-data-parallel replica that must not write them again),
EP2 x DP2 and PP2 x EP2. Tiny gpt-oss (experts stored fused over the layer, gate/up interleaved,
with biases) on the 4 ranks at TP2 x EP2 + SP, EP2 x DP2 and PP2 x EP2 (expert-TP 1: megatron's
expert biases): the same fused tensors as the source, each stage's written by EP rank 0 alone.
One launch per world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MOE_MODELS
from tests.launch import run_ranks

LAYOUTS = {
    2: [dict(ep=2)],
    4: [dict(tp=2, sp=True, ep=2, etp=2), dict(tp=2, sp=True, ep=2), dict(ep=2), dict(pp=2, ep=2)],
}
GPT_OSS_LAYOUTS = {2: [], 4: [dict(tp=2, sp=True, ep=2), dict(ep=2), dict(pp=2, ep=2)]}


def layout_name(lay: dict) -> str:
    return "_".join(f"{k}{int(v)}" for k, v in lay.items())


def read_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    tensors, where = {}, {}
    for f in sorted(d.glob("*.safetensors")):
        for name, t in load_file(f).items():
            assert name not in tensors, f"{d.name}: {name} in {where[name]} and {f.name}"
            tensors[name], where[name] = t, f.name
    return tensors


def assert_same_as_source(out: Path, src: Path, lay: dict, fused: bool = False) -> int:
    got, want = read_dir(out), read_dir(src)
    assert sorted(got) == sorted(want), (f"{out.name}: missing {sorted(set(want) - set(got))[:5]}, "
                                         f"extra {sorted(set(got) - set(want))[:5]}")
    differ = [n for n in want if not same_bits(got[n], want[n])]
    assert not differ, f"{out.name}: {len(differ)} tensors differ from the source, e.g. {differ[:5]}"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
    # One writer per part: the dense part of each pipeline stage and one expert part per EP rank
    # and stage (every stage of the tiny models holds MoE layers); no replica writes again. Fused
    # experts (gpt-oss): one expert part per stage, written by its EP rank 0.
    stages, eps = range(lay.get("pp", 1)), range(lay["ep"])
    experts = [f"part{s:05d}-experts" for s in stages] if fused else \
        [f"part{s:05d}-experts{e:05d}" for s in stages for e in eps]
    parts = [f"part{s:05d}" for s in stages] + experts
    writers = [p for f in sorted(out.parent.glob(f"{out.name}.writers.rank*.json")) for p in json.loads(f.read_text())]
    assert sorted(writers) == sorted(parts), f"{out.name}: parts written {sorted(writers)}, expected each of {parts} once"
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == len(parts), [f.name for f in files]
    cfg, src_cfg = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    drop = ("dtype", "torch_dtype")
    assert {k: v for k, v in cfg.items() if k not in drop} == {k: v for k, v in src_cfg.items() if k not in drop}
    return len(want)


def same_bits(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int))


def run_world(world: int, sources, tmp_path) -> list[tuple]:
    cases, expected = [], []
    for fam, layouts in [*((f, LAYOUTS[world]) for f in MOE_MODELS), ("gpt_oss", GPT_OSS_LAYOUTS[world])]:
        for lay in layouts:
            out = tmp_path / f"{fam}_{layout_name(lay)}"
            cases.append(dict(hf_dir=str(sources[fam]), out=str(out), **lay))
            expected.append((fam, lay, out))
    spec = tmp_path / f"handoff{world}.json"
    spec.write_text(json.dumps({"cases": cases}))
    run_ranks(world, "tests.handoff_worker", [str(spec)])
    return expected


def check(expected, sources) -> None:
    for fam, lay, out in expected:
        n = assert_same_as_source(out, Path(sources[fam]), lay, fused=fam == "gpt_oss")
        print(f"handoff {fam} {layout_name(lay)}: {n} tensors equal the source bit for bit")


@pytest.mark.dist
def test_moe_handoff_two_ranks(tiny_hf_dirs, tmp_path):
    check(run_world(2, tiny_hf_dirs, tmp_path), tiny_hf_dirs)


@pytest.mark.dist
def test_moe_handoff_four_ranks(tiny_hf_dirs, tmp_path):
    from aipo_mp.testing.hf_build import save_hf_model
    from tests.conftest import tiny_arch

    sources = {**tiny_hf_dirs, "gpt_oss": save_hf_model(tiny_arch("gpt_oss"), tmp_path / "gpt_oss_source", seed=11)}
    check(run_world(4, sources, tmp_path), sources)
