"""Conversion throughput and memory: a Mistral-Large-2407-shaped checkpoint, or (--depth) a
narrow Llama at several depths to show that per-process memory does not grow with the layers.

Builds a random bf16 HF checkpoint with Mistral-Large's shapes (hidden 12288, FFN 28672, 96
heads, 8 kv heads, head_dim 128, vocab 32768; 2 layers by default: ~8 GB), then for each layout
converts HF -> Megatron and back with `python -m checkpoint_tools` (which starts one process per
rank), checks the round trip is bit-exact (streaming, one tensor at a time) and prints GB/s and
the peak RSS of every rank process.

    python benchmarks/convert.py                          # full size, TP=8 and TP=4 x PP=2 (~8 GB)
    python benchmarks/convert.py --scale 0.125 --layers 2 # quick check (~130 MB)
    python benchmarks/convert.py --depth                  # narrow Llama at 2, 16, 64 layers, TP=1 and TP=2
    python benchmarks/convert.py --depth --tool-root DIR  # the same with the checkpoint_tools of another tree
    python benchmarks/convert.py --moe qwen3_moe          # MoE: 4 and 32 experts, EP=1 and EP2 x TP2 (ETP2)
    python benchmarks/convert.py --moe mixtral --fused --experts 8,64 --moe-layouts 1x1x1,1x4x1

--scale multiplies hidden, FFN, head_dim and vocab (heads and kv heads stay 96 and 8 so TP=8
divides them). Needs about 3x the model size free on disk (source, Megatron, HF copy).

--moe FAMILY (qwen3_moe | mixtral): random bf16 mixture-of-experts models with the same layers and
each number of `--experts` (hidden and expert FFN `--moe-width`, 8 heads / 4 kv heads of 128,
vocab 32000), per-expert tensors or (`--fused`) transformers 5's fused 3-D experts; each
converted HF -> Megatron -> HF at each TPxEPxETP of `--moe-layouts` (round trip checked
bit-exact): GB/s and peak memory per process against the number of experts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISTRAL_LARGE = dict(hidden_size=12288, intermediate_size=28672, num_attention_heads=96, num_key_value_heads=8,
                     head_dim=128, vocab_size=32768)


def shapes_for(args) -> dict:
    def scaled(v: int, mult: int) -> int:
        return max(mult, int(round(v * args.scale / mult)) * mult)

    cfg = dict(MISTRAL_LARGE)
    if args.scale != 1.0:
        cfg["head_dim"] = scaled(cfg["head_dim"], 8)
        cfg["hidden_size"] = cfg["num_attention_heads"] * cfg["head_dim"]  # as in Mistral-Large: 96 x 128
        cfg["intermediate_size"] = scaled(cfg["intermediate_size"], 64)
        cfg["vocab_size"] = scaled(cfg["vocab_size"], 64)
    cfg["num_hidden_layers"] = args.layers
    return cfg


# The narrow Llama of --depth: a 32 MB (bf16) layer, so 64 layers are ~2.1 GB.
NARROW_LLAMA = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=128, vocab_size=32000)


def hf_config(shape: dict, family: str = "mistral") -> dict:
    arch = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}[family]
    return {
        "architectures": [arch], "model_type": family, **shape,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "hidden_act": "silu", "sliding_window": None,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "torch_dtype": "bfloat16",
    }


def tensor_shapes(shape: dict) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    h, f, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv, v = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd, shape["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_hf(out: Path, shape: dict, shard_bytes: int, seed: int = 0, family: str = "mistral") -> dict:
    """Random bf16 weights, written shard by shard (never the whole model in memory). Values come
    from a 64M-element random pool read at random offsets: distinct tensors, fast to make."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 26, generator=g) * 0.02).to(torch.bfloat16)

    def make(shp) -> torch.Tensor:
        n = numel(shp)
        parts, left = [], n
        while left:
            start = int(torch.randint(0, pool.numel(), (1,), generator=g))
            take = min(left, pool.numel() - start)
            parts.append(pool[start:start + take])
            left -= take
        return torch.cat(parts).reshape(shp) if len(parts) > 1 else parts[0].clone().reshape(shp)

    out.mkdir(parents=True)
    specs = tensor_shapes(shape)
    groups, cur, size = [], [], 0
    for name, shp in specs:
        b = numel(shp) * 2
        if cur and size + b > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += b
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: make(shp) for name, shp in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * 2
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(hf_config(shape, family), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return {"bytes": total, "tensors": len(specs), "files": len(groups)}


def moe_arch(family: str, experts: int, width: int, layers: int):
    from aipo_mp.config import ModelArch

    return ModelArch(family=family, hidden_size=width, intermediate_size=width, num_layers=layers,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=32000,
                     qk_norm=family == "qwen3_moe", num_experts=experts, num_experts_per_tok=2,
                     moe_intermediate_size=width, norm_topk_prob=True, tie_embeddings=False,
                     max_position_embeddings=4096, rms_norm_eps=1e-6)


def build_moe_hf(out: Path, arch, fused: bool, seed: int = 0) -> dict:
    """Random bf16 weights of an MoE model, one safetensors file per layer (names and shapes from
    the family's table; `fused`: each layer's experts as transformers 5's gate_up_proj / down_proj
    and Mixtral's router as mlp.gate.weight)."""
    import torch
    from safetensors.torch import save_file

    from aipo_mp.convert.common import expected_hf_shapes
    from aipo_mp.models import get_family, hf_config_for

    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)

    def make(shp) -> torch.Tensor:  # a run of the random pool from a random start (wrapping around)
        n, start = numel(shp), int(torch.randint(0, pool.numel(), (1,), generator=g))
        return pool.repeat(-(-(start + n) // pool.numel()))[start:start + n].clone().reshape(shp)

    names = get_family(arch.family).hf_names(arch)
    shapes = expected_hf_shapes(arch, names)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".")[2] if n.startswith("model.layers.") else "other", []).append(n)
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for part, group in groups.items():
        tensors = {n: make(shapes.get(n, (arch.head_dim,) if "_norm" in n else (arch.hidden_size,))) for n in group}
        if fused and part != "other" and int(part) not in arch.dense_layers:
            tensors = fuse_layer(tensors, int(part), arch)
        fname = f"model-{part}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    cfg = hf_config_for(arch)
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return {"bytes": total, "tensors": len(weight_map)}


def fuse_layer(tensors: dict, i: int, arch) -> dict:
    """One layer's per-expert tensors -> transformers 5's fused ones (gate rows, then up rows)."""
    import torch

    gate_up_down = {"qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj",
                                  "mlp.gate"),
                    "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                                "block_sparse_moe.experts.{e}.w2", "block_sparse_moe.gate")}[arch.family]
    p = f"model.layers.{i}."
    gate, up, down, router = (p + n + ".weight" for n in gate_up_down)
    experts = range(arch.num_experts)
    out = {k: v for k, v in tensors.items() if ".experts." not in k and k != router.format()}
    out[p + "mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([tensors[gate.format(e=e)], tensors[up.format(e=e)]]) for e in experts])
    out[p + "mlp.experts.down_proj"] = torch.stack([tensors[down.format(e=e)] for e in experts])
    out[p + "mlp.gate.weight"] = tensors[router.format()]
    return out


def moe_benchmark(args) -> int:
    """Peak memory per process and GB/s against the number of experts, both directions."""
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="aipo_moe_bench."))
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.experts.split(",")]
    layouts = [tuple(int(x) for x in lay.lower().split("x")) for lay in args.moe_layouts.split(",")]
    rows = []
    try:
        for experts in counts:
            arch = moe_arch(args.moe, experts, args.moe_width, args.layers)
            src = work / f"hf_{experts}"
            t0 = time.perf_counter()
            built = build_moe_hf(src, arch, args.fused)
            print(f"{args.moe}, {experts} experts, {args.layers} layers, width {args.moe_width}"
                  f"{', fused experts' if args.fused else ''}: {gb(built['bytes'])} in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            for tp, ep, etp in layouts:
                mc, back = work / f"mc_{experts}_{tp}x{ep}x{etp}", work / f"back_{experts}_{tp}x{ep}x{etp}"
                to_mc = run_tool(["hf-to-mcore", "--hf", str(src), "--out", str(mc), "--tp", str(tp), "--ep", str(ep),
                                  "--etp", str(etp)], work / "r1.json", quiet=True)
                to_hf = run_tool(["mcore-to-hf", "--ckpt", str(mc), "--out", str(back)], work / "r2.json", quiet=True)
                _, bad = compare_streaming(src, back)
                for direction, rep in (("hf-to-mcore", to_mc), ("mcore-to-hf", to_hf)):
                    row = dict(experts=experts, tp=tp, ep=ep, etp=etp, direction=direction, model_bytes=built["bytes"],
                               ranks=len(rep["ranks"]), exact=not bad,
                               peak_rss_bytes=max(r["peak_rss_bytes"] for r in rep["ranks"]), **rank_numbers(rep))
                    rows.append(row)
                    print(f"  {experts:3d} experts  TP={tp} EP={ep} ETP={etp} ({row['ranks']} ranks)  {direction:11s}  "
                          f"peak RSS/process {gb(row['peak_rss_bytes'])}, private {gb(row['peak_private_bytes'])}  "
                          f"{row['gb_per_s']:.3f} GB/s over {row['data_s']:.2f} s  wall {row['wall_s']:.1f} s  "
                          f"round trip {'bit-exact' if not bad else 'DIFFERENT'}", flush=True)
                shutil.rmtree(mc, ignore_errors=True)
                shutil.rmtree(back, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
        print(f"\n== peak RSS per process: {max(counts)} / {min(counts)} experts ==")
        for tp, ep, etp in layouts:
            for direction in ("hf-to-mcore", "mcore-to-hf"):
                sel = {r["experts"]: r for r in rows if (r["tp"], r["ep"], r["etp"], r["direction"]) == (tp, ep, etp, direction)}
                hi, lo = sel[max(counts)], sel[min(counts)]
                print(f"TP={tp} EP={ep} ETP={etp} {direction:11s}: {gb(hi['peak_rss_bytes'])} / {gb(lo['peak_rss_bytes'])}"
                      f" = {hi['peak_rss_bytes'] / lo['peak_rss_bytes']:.3f}x (model {gb(hi['model_bytes'])} / "
                      f"{gb(lo['model_bytes'])})")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0 if all(r["exact"] for r in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def compare_streaming(a: Path, b: Path) -> tuple[int, list[str]]:
    """torch.equal on every tensor, one tensor pair in memory at a time."""
    import torch

    from aipo_mp.convert.hf_io import HFWeights

    wa, wb = HFWeights(a), HFWeights(b)
    names = wa.names()
    bad = sorted(set(names) ^ set(wb.names()))
    for n in names:
        if n in bad:
            continue
        x, y = wa.get(n), wb.get(n)
        if not (x.dtype == y.dtype and torch.equal(x, y)):
            bad.append(n)
        del x, y
    return len(names), bad


def run_tool(argv: list[str], report: Path, root: Path = ROOT, quiet: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "checkpoint_tools", *argv, "--report", str(report)], cwd=root, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"checkpoint_tools {' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    if not quiet:
        print(p.stdout.rstrip())
    rep = json.loads(report.read_text())
    rep["outer_wall_s"] = wall
    return rep


def memory_estimate(model_bytes: int, tp: int, pp: int, largest_tensor: int, shard_bytes: int) -> int:
    """Rough peak memory of a layout: ~0.6 GB of torch + megatron per process, the model once
    (each rank holds its shard), and on each pipeline stage's TP-rank-0 during the export one
    merged tensor, one received shard and a buffered output shard."""
    ranks = tp * pp
    return int(ranks * 0.6e9 + model_bytes * 1.1 + pp * (largest_tensor * (1 + 1 / tp) + shard_bytes))


def available_memory():
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def rank_numbers(rep: dict) -> dict:
    """Per-process peak private memory and the data rate of one tool run (either version of the
    tool: the rate is bytes read + written over the conversion phase when the run reports it,
    else the model bytes twice over the slowest rank's time)."""
    ranks = rep["ranks"]
    peak = max(r.get("peak_anon_bytes") or 0 for r in ranks)
    if all("convert_s" in r for r in ranks):
        secs = max(r["convert_s"] for r in ranks)
        moved = sum(r["bytes_read"] + r["bytes_written"] for r in ranks)
    else:  # the tool before streaming: its data phases
        secs = max(sum(v for k, v in r.items() if k in ("load_s", "save_s", "export_s")) for r in ranks)
        moved = 2 * ranks[0]["model_bytes"]
    return {"peak_private_bytes": peak, "data_s": secs, "gb_per_s": moved / max(secs, 1e-9) / 1e9,
            "wall_s": rep["wall_s"]}


def depth_benchmark(args) -> int:
    """Narrow Llama at each depth and layout: peak private memory per process and GB/s, both
    directions, round trip checked bit-exact."""
    root = Path(args.tool_root).absolute() if args.tool_root else ROOT
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="aipo_depth_bench."))
    work.mkdir(parents=True, exist_ok=True)
    depths = [int(x) for x in args.depths.split(",")]
    layouts = [tuple(int(x) for x in lay.lower().split("x")) for lay in args.depth_layouts.split(",")]
    rows = []
    try:
        for depth in depths:
            shape = dict(NARROW_LLAMA, num_hidden_layers=depth)
            src = work / f"hf_{depth}"
            built = build_hf(src, shape, 2 * 10**9, family="llama")
            for tp, pp in layouts:
                mc, back = work / f"mc_{depth}_{tp}x{pp}", work / f"back_{depth}_{tp}x{pp}"
                to_mc = run_tool(["hf-to-mcore", "--hf", str(src), "--out", str(mc), "--tp", str(tp), "--pp", str(pp)],
                                 work / "r1.json", root, quiet=True)
                to_hf = run_tool(["mcore-to-hf", "--ckpt", str(mc), "--out", str(back)], work / "r2.json", root,
                                 quiet=True)
                _, bad = compare_streaming(src, back)
                for direction, rep in (("hf-to-mcore", to_mc), ("mcore-to-hf", to_hf)):
                    row = dict(depth=depth, tp=tp, pp=pp, direction=direction, model_bytes=built["bytes"],
                               exact=not bad, **rank_numbers(rep))
                    rows.append(row)
                    print(f"layers {depth:3d}  TP={tp} PP={pp}  {direction:11s}  peak private/process "
                          f"{gb(row['peak_private_bytes'])}  {row['gb_per_s']:.3f} GB/s over {row['data_s']:.2f} s  "
                          f"wall {row['wall_s']:.1f} s  model {gb(built['bytes'])}  "
                          f"round trip {'bit-exact' if not bad else 'DIFFERENT'}", flush=True)
                shutil.rmtree(mc, ignore_errors=True)
                shutil.rmtree(back, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
        print("\n== peak private memory per process: deepest / shallowest ==")
        for (tp, pp) in layouts:
            for direction in ("hf-to-mcore", "mcore-to-hf"):
                sel = [r for r in rows if (r["tp"], r["pp"], r["direction"]) == (tp, pp, direction)]
                lo, hi = min(sel, key=lambda r: r["depth"]), max(sel, key=lambda r: r["depth"])
                print(f"TP={tp} PP={pp} {direction:11s}: {gb(hi['peak_private_bytes'])} at {hi['depth']} layers / "
                      f"{gb(lo['peak_private_bytes'])} at {lo['depth']} layers = "
                      f"{hi['peak_private_bytes'] / max(lo['peak_private_bytes'], 1):.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0 if all(r["exact"] for r in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", action="store_true", help="the narrow-Llama depth benchmark instead")
    ap.add_argument("--depths", default="2,16,64", help="layer counts of --depth")
    ap.add_argument("--depth-layouts", default="1x1,2x1", help="TPxPP layouts of --depth")
    ap.add_argument("--tool-root", default=None, help="run the checkpoint_tools of this source tree (A/B)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink hidden/FFN/head_dim/vocab by this factor")
    ap.add_argument("--layouts", default="8x1,4x2", help="comma-separated TPxPP layouts")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--max-shard-size", default="2GB", help="HF shard size for the source and the export")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    ap.add_argument("--force", action="store_true", help="run a layout even if memory looks too small")
    ap.add_argument("--moe", choices=("qwen3_moe", "mixtral"), default=None,
                    help="the mixture-of-experts benchmark for this family instead")
    ap.add_argument("--experts", default="4,32", help="expert counts of --moe")
    ap.add_argument("--moe-width", type=int, default=1024, help="hidden size and expert FFN width of --moe")
    ap.add_argument("--moe-layouts", default="1x1x1,2x2x2", help="TPxEPxETP layouts of --moe")
    ap.add_argument("--fused", action="store_true", help="--moe sources in transformers 5's fused expert layout")
    args = ap.parse_args()
    if args.depth:
        return depth_benchmark(args)
    if args.moe:
        return moe_benchmark(args)

    from aipo_mp.convert.common import parse_size

    shape = shapes_for(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="aipo_convert_bench."))
    work.mkdir(parents=True, exist_ok=True)
    results = {"shape": shape, "layouts": []}
    try:
        h, f, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
        layer = h * (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * hd
        layer += shape["num_attention_heads"] * hd * h + 3 * h * f + 2 * h
        largest_tensor = max(numel(s) for _, s in tensor_shapes(shape)) * 2
        print(f"model: {json.dumps(shape)}")
        print(f"largest single layer: {gb(layer * 2)} ({layer / 1e9:.3f}B params); largest HF tensor "
              f"{gb(largest_tensor)}; largest Megatron tensor (fused fc1) {gb(2 * f * h * 2)}")
        src = work / "hf_src"
        t0 = time.perf_counter()
        built = build_hf(src, shape, parse_size(args.max_shard_size))
        print(f"built {src}: {gb(built['bytes'])} in {built['files']} files, {time.perf_counter() - t0:.1f} s")
        results.update(model_bytes=built["bytes"], layer_bytes=layer * 2, largest_hf_tensor_bytes=largest_tensor)
        for lay in args.layouts.split(","):
            tp, pp = (int(x) for x in lay.lower().split("x"))
            mc, back = work / f"mc_tp{tp}_pp{pp}", work / f"hf_tp{tp}_pp{pp}"
            print(f"\n== TP={tp} x PP={pp}: {tp * pp} rank processes ==")
            need = memory_estimate(built["bytes"], tp, pp, 2 * f * h * 2, parse_size(args.max_shard_size))
            avail = available_memory()
            if avail is not None and avail < need and not args.force:
                print(f"skipped: needs about {gb(need)} of memory, {gb(avail)} available (--force to run anyway)")
                continue
            to_mc = run_tool(["hf-to-mcore", "--hf", str(src), "--out", str(mc), "--tp", str(tp), "--pp", str(pp)],
                             work / "r1.json")
            to_hf = run_tool(["mcore-to-hf", "--ckpt", str(mc), "--out", str(back), "--max-shard-size",
                              args.max_shard_size], work / "r2.json")
            t0 = time.perf_counter()
            count, bad = compare_streaming(src, back)
            cmp_s = time.perf_counter() - t0
            print(f"round trip: {count} tensors compared in {cmp_s:.1f} s: "
                  f"{'bit-exact' if not bad else 'DIFFERENT: ' + ', '.join(bad[:5])}")
            entry = {"tp": tp, "pp": pp, "exact": not bad}
            for key, rep in (("hf_to_mcore", to_mc), ("mcore_to_hf", to_hf)):
                ranks = rep["ranks"]
                entry[key] = {**rank_numbers(rep),
                              "peak_rss_gb": [round(r["peak_rss_bytes"] / 1e9, 3) for r in ranks],
                              "peak_anon_gb": [round((r.get("peak_anon_bytes") or 0) / 1e9, 3) for r in ranks],
                              "phases_s": {k: round(max(r[k] for r in ranks), 2) for k in ranks[0] if k.endswith("_s")}}
            results["layouts"].append(entry)
            shutil.rmtree(mc, ignore_errors=True)
            shutil.rmtree(back, ignore_errors=True)
        print("\n== summary ==")
        print(f"model {gb(results['model_bytes'])}, largest layer {gb(results['layer_bytes'])}")
        for e in results["layouts"]:
            for key in ("hf_to_mcore", "mcore_to_hf"):
                r = e[key]
                print(f"TP={e['tp']} PP={e['pp']} {key:12s} {r['gb_per_s']:.3f} GB/s (read + written) over the "
                      f"{r['data_s']:.1f} s conversion phase, {r['wall_s']:.1f} s wall; per process: peak private "
                      f"{min(r['peak_anon_gb']):.2f}-{max(r['peak_anon_gb']):.2f} GB, peak RSS incl. mmap "
                      f"{min(r['peak_rss_gb']):.2f}-{max(r['peak_rss_gb']):.2f} GB; phases {r['phases_s']}")
            print(f"TP={e['tp']} PP={e['pp']} round trip bit-exact: {e['exact']}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0 if all(e["exact"] for e in results["layouts"]) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
