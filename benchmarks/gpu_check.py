"""One-GPU check of the trainer's GPU path (NCCL, world size 1), in under 10 minutes on an H100/H200.

Run it through `bash benchmarks/gpu_check.sh` on a machine with CUDA torch and no network (the
script installs the wheels of `make gpu-wheels` into a venv first); `python benchmarks/gpu_check.py`
directly where megatron-core and transformers are installed. Three checks, each printed and kept
in the JSON summary:

1. parity    Megatron (local backend, bf16) vs transformers (bf16 and fp32) logits of a tiny
             Llama on one sequence: fails if Megatron-bf16 is further from transformers-fp32 than
             2x transformers-bf16 is (+1e-3), or further than --parity-tol from transformers-bf16.
2. resume    a tiny Llama trained 6 steps straight, and 3 steps then resumed for 3 more from its
             checkpoint (model + megatron distributed-optimizer state through dist_checkpointing,
             every collective on NCCL): final weights within 1e-5 relative (fp32; bit-exact
             reported separately: GPU kernels need not be deterministic).
3. slice     --steps training steps of a Mistral-Large-shaped slice (real hidden/FFN/heads/vocab,
             --layers layers) in bf16 with the local backend and megatron's optimizer (fp32 main
             weights): tokens/s, model TFLOP/s, MFU against the GPU's bf16 dense peak
             (aipo_mp.planner.GPUS), peak GPU memory (torch.cuda.max_memory_allocated/reserved)
             next to the planner's estimate for that slice. No checkpoint is written for the slice
             (its optimizer state alone is ~43 GB).

    python benchmarks/gpu_check.py [--steps 20] [--seq-length 2048] [--json runs/gpu_check/summary.json]
    python benchmarks/gpu_check.py --allow-cpu --scale 0.0625 --steps 4   # the code path on CPU (gloo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import types
from pathlib import Path

from aipo_mp.models import num_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GiB = 2**30


def log(msg: str) -> None:
    print(msg, flush=True)


def tiny_llama():
    from aipo_mp.config import load_config

    return load_config(ROOT / "configs" / "models" / "tiny_llama.yaml").model.arch


# ---------------------------------------------------------------------------------------------
# 1. parity
# ---------------------------------------------------------------------------------------------


def check_parity(work: Path, tol: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from aipo_mp.config import ParallelConfig, PrecisionConfig
    from aipo_mp.convert.hf_io import HFWeights
    from aipo_mp.models import get_family
    from aipo_mp.models.build import build_model, load_hf_weights
    from aipo_mp.runtime import platform
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.training.forward import model_forward

    arch = tiny_llama()
    hf_dir = save_hf_model(arch, work / "parity_hf", seed=7)
    platform.initialize_model_parallel(1, 1)
    platform.seed_model_parallel_rng(7)
    dev = platform.device()
    built = build_model(get_family(arch.family), arch, ParallelConfig(), PrecisionConfig(dtype="bf16", backend="local"),
                        initialize=False)
    load_hf_weights(built, HFWeights(str(hf_dir)).get)
    model = built.chunks[0].eval()
    g = torch.Generator().manual_seed(0)
    length = 96
    tokens = torch.randint(4, arch.vocab_size, (1, length), generator=g)
    with torch.no_grad():
        ours = model_forward(model, tokens.to(dev), torch.tensor([0, length], dtype=torch.int32, device=dev),
                             length)[0].float()
        refs = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="eager")
            refs[name] = hf.to(dev).eval()(tokens.to(dev)).logits[0].float()
            del hf
    # bf16 rounding alone moves transformers' own bf16 logits away from its fp32 ones; Megatron's
    # bf16 logits must stay as close to the fp32 reference as that (within 2x, plus 1e-3).
    ours_err = float((ours - refs["fp32"]).abs().max())
    hf_err = float((refs["bf16"] - refs["fp32"]).abs().max())
    top1 = float((ours.argmax(-1) == refs["bf16"].argmax(-1)).float().mean())
    out = {"max_abs_diff_vs_hf_bf16": float((ours - refs["bf16"]).abs().max()),
           "max_abs_diff_vs_hf_fp32": ours_err, "hf_bf16_vs_fp32": hf_err,
           "logit_scale": float(refs["fp32"].abs().max()), "top1_agreement_vs_hf_bf16": top1, "tol": tol}
    out["ok"] = ours_err <= 2 * hf_err + 1e-3 and out["max_abs_diff_vs_hf_bf16"] <= tol
    log(f"parity (bf16, tiny llama, {length} tokens): Megatron vs transformers-bf16 max |diff| "
        f"{out['max_abs_diff_vs_hf_bf16']:.4g}; vs transformers-fp32 {ours_err:.4g} (transformers-bf16 itself: "
        f"{hf_err:.4g}; logits up to {out['logit_scale']:.3g}); top-1 agreement {top1:.4f} -> "
        f"{'ok' if out['ok'] else 'FAILED'}")
    del built, model, refs
    return out


# ---------------------------------------------------------------------------------------------
# 2. save and resume
# ---------------------------------------------------------------------------------------------


def trained_weights(state) -> dict:
    return {k: v.detach().float().cpu().clone() for k, v in state.built.chunks[0].state_dict().items()
            if hasattr(v, "detach") and not k.endswith("_extra_state")}


def profiled_step(state, step: int) -> dict:
    """One training step under torch.profiler: prints the 12 costliest GPU kernels and the share of
    the step's GPU time spent inside core attention (the local backend's per-sequence loop)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from aipo_mp.models.layers import TorchCoreAttention
    from aipo_mp.training.loop import train_step

    original = TorchCoreAttention.forward

    def traced(self, *a, **k):
        with record_function("core_attention"):
            return original(self, *a, **k)

    TorchCoreAttention.forward = traced
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            record = train_step(state, step)
            torch.cuda.synchronize()
    finally:
        TorchCoreAttention.forward = original
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)
    total = sum(e.self_device_time_total for e in events)
    attn = sum(e.device_time_total for e in events if e.key == "core_attention")
    log(f"profiled step {step + 1}: GPU time {total / 1e6:.2f} s, core attention (forward) {attn / 1e6:.2f} s "
        f"({attn / max(total, 1):.1%}), wall {record['step_time_s']:.2f} s")
    return record


def check_resume(work: Path) -> dict:
    import torch

    from aipo_mp.config import load_config
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl
    from aipo_mp.testing.tiny import build_tiny_tokenizer
    from aipo_mp.training.loop import train

    tok = build_tiny_tokenizer(work / "tokenizer_512", vocab_size=512)
    model = save_hf_model(tiny_llama(), work / "resume_hf", seed=3, tokenizer_dir=tok)
    pairs = write_jsonl(marker_pairs(96, seed=1), work / "resume_pairs.jsonl")
    base = [f"model.path={model}", f"data.train={pairs}", "train.global_batch_pairs=8", "train.seq_length=128",
            "train.lr=1e-4", "train.warmup_steps=0", "train.schedule=constant", "data.max_prompt_length=32",
            "output.tensorboard=false", "precision.dtype=fp32", "precision.backend=local"]

    def run(name: str, steps: int, save_every: int = 0):
        cfg = load_config(None, [*base, f"train.steps={steps}", f"train.save_every={save_every}",
                                 f"output.dir={work / name}"])
        return train(cfg)

    for name in ("resume_straight", "resume_killed"):
        import shutil

        shutil.rmtree(work / name, ignore_errors=True)
    t0 = time.perf_counter()
    straight = trained_weights(run("resume_straight", 6))
    run("resume_killed", 3)
    resumed = trained_weights(run("resume_killed", 6))
    worst = max(float((resumed[k] - v).abs().max() / v.abs().max().clamp(min=1e-12)) for k, v in straight.items())
    exact = all(torch.equal(resumed[k], v) for k, v in straight.items())
    steps = [json.loads(l)["step"] for l in (work / "resume_killed" / "metrics.jsonl").read_text().splitlines()]
    out = {"max_rel_param_diff": worst, "bit_exact": exact, "steps_logged": steps,
           "optimizer_saved": (work / "resume_killed" / "checkpoints" / "step_0000003" / "optimizer").is_dir(),
           "wall_s": time.perf_counter() - t0}
    out["ok"] = worst <= 1e-5 and steps == list(range(1, 7)) and out["optimizer_saved"]
    log(f"resume (fp32, tiny llama, 3 + 3 steps vs 6): max relative weight difference {worst:.3g}, bit-exact "
        f"{exact}, steps {steps} -> {'ok' if out['ok'] else 'FAILED'}")
    return out


# ---------------------------------------------------------------------------------------------
# 3. Mistral-Large-shaped slice
# ---------------------------------------------------------------------------------------------


def check_slice(args, work: Path) -> dict:
    import torch
    import train_step as bench  # benchmarks/train_step.py: slice, data, FLOPs and GPU lookup
    from transformers import AutoTokenizer

    from aipo_mp import planner
    from aipo_mp.config import config_from_dict
    from aipo_mp.runtime import platform
    from aipo_mp.training.loop import train_step
    from aipo_mp.training.reference import compute_reference
    from aipo_mp.training.state import setup

    arch = bench.load_arch(args.model_config, args.layers, args.scale)
    log(f"slice: {arch.num_layers} layers, hidden {arch.hidden_size}, FFN {arch.intermediate_size}, heads "
        f"{arch.num_attention_heads}/{arch.num_key_value_heads} x {arch.head_dim}, vocab {arch.vocab_size}: "
        f"{num_params(arch) / 1e9:.3f}B parameters")
    est = planner.memory_per_gpu(arch, planner.Layout(), dtype="bf16", seq_length=args.seq_length,
                                 recompute="none", distributed_optimizer=True, reference_mode="initial",
                                 num_microbatches_in_flight=1, backend="local")
    cuda = torch.cuda.is_available()
    capacity = torch.cuda.mem_get_info()[1] if cuda else None
    if cuda and est.total > capacity:
        raise SystemExit(f"error: the planner estimates {est.total / GiB:.1f} GiB for this slice at seq "
                         f"{args.seq_length}, more than the GPU's {capacity / GiB:.1f} GiB; pass a smaller --seq-length")
    t0 = time.perf_counter()
    model = bench.build_checkpoint(arch, work)
    max_len = args.seq_length // 2
    ns = types.SimpleNamespace(steps=args.steps, global_batch_pairs=args.global_batch_pairs, pairs_dist="chat",
                               seed=0)
    data = work / f"slice_pairs_{args.steps * args.global_batch_pairs}_{max_len}.jsonl"
    pairs = bench.write_pairs(ns, AutoTokenizer.from_pretrained(str(model)), data, max_len)
    f_fwd, s_eff = bench.flops_per_token(arch, pairs)
    tp_args = types.SimpleNamespace(tp=1, pp=1, ep=1, etp=1, steps=args.steps, global_batch_pairs=args.global_batch_pairs,
                                    seq_length=args.seq_length, seed=0)
    raw = bench.train_config(tp_args, model, data, work / "slice_out", max_len, "bf16")
    raw["precision"]["backend"] = "local"
    cfg = config_from_dict(raw)
    log(f"slice: checkpoint and data ready ({time.perf_counter() - t0:.0f} s)")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    state = setup(cfg)
    state.ref_table = compute_reference(state).to(platform.device())
    records = []
    for step in range(args.steps):
        if args.profile and step == args.steps - 2:
            records.append(profiled_step(state, step))
        else:
            records.append(train_step(state, step))
        log(f"  step {step + 1}: loss {records[-1]['loss']:.4f}, {records[-1]['step_time_s']:.3f} s, "
            f"{records[-1]['tokens_per_s']:,.0f} tokens/s")
    timed = records[args.warmup_steps:]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    tflops = 3 * f_fwd * tps / 1e12
    gpu_name, gpu_spec = bench.detect_gpu(args.gpu)
    out = {
        "arch": dataclasses.asdict(arch), "params": num_params(arch), "seq_length": args.seq_length,
        "global_batch_pairs": args.global_batch_pairs, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "device": gpu_name or "cpu", "tokens_per_s": tps,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "token_utilization": statistics.mean(r["token_utilization"] for r in timed),
        "forward_flops_per_token": f_fwd, "attention_seq_len": s_eff, "model_tflops": tflops,
        "mfu": tflops / gpu_spec.peak_tflops if gpu_spec else None,
        "gpu_peak_tflops": gpu_spec.peak_tflops if gpu_spec else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB if cuda else None,
        "planner_total_gib": est.total / GiB,
        "planner_parts_gib": {k: getattr(est.binding, k) / GiB for k in
                              ("weights", "grads", "optimizer", "activations", "logits", "overhead")},
        "losses": [r["loss"] for r in records],
    }
    out["ok"] = all(r["loss"] == r["loss"] for r in records)  # finite losses (NaN != NaN)
    log(f"slice (bf16, {args.steps} steps, {len(timed)} timed): {tps:,.0f} tokens/s, {tflops:.1f} model TFLOP/s"
        + (f", MFU {out['mfu']:.1%} of {gpu_spec.peak_tflops:.0f} TFLOP/s ({gpu_spec.name})" if gpu_spec else "")
        + (f"; peak GPU memory {out['peak_allocated_gib']:.1f} GiB allocated / {out['peak_reserved_gib']:.1f} GiB "
           f"reserved vs planner {out['planner_total_gib']:.1f} GiB" if cuda else
           f"; planner estimate {out['planner_total_gib']:.2f} GiB"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="configs/models/mistral_large_123b.yaml")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink hidden/FFN/head_dim (CPU dry runs only)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--global-batch-pairs", type=int, default=16)
    ap.add_argument("--parity-tol", type=float, default=0.25, help="max |logit diff| in bf16")
    ap.add_argument("--gpu", default=None, help="planner GPU name for the MFU peak (default: from nvidia-smi)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "gpu_check"))
    ap.add_argument("--json", default=None, help="summary file (default WORK/summary.json)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU with gloo (to test this script)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["parity", "resume", "slice"])
    ap.add_argument("--profile", action="store_true", help="profile the slice's second-to-last step")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch deterministic algorithms (set CUBLAS_WORKSPACE_CONFIG=:4096:8 too)")
    args = ap.parse_args()
    if not 0 <= args.warmup_steps < args.steps:
        ap.error("need 0 <= --warmup-steps < --steps")

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device visible to torch; this check needs one GPU (or --allow-cpu to test the script)",
              file=sys.stderr)
        return 2
    from aipo_mp.runtime import platform

    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = platform.init_distributed()
    summary = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "backend": torch.distributed.get_backend(), "world_size": env.world_size}
    log(f"gpu_check on {summary['device']} (torch {summary['torch']}, CUDA {summary['cuda']}, "
        f"{summary['backend']}, world size {env.world_size})")
    t0 = time.perf_counter()
    checks = {"parity": lambda: check_parity(work, args.parity_tol), "resume": lambda: check_resume(work),
              "slice": lambda: check_slice(args, work)}
    for name, fn in checks.items():
        if name not in args.skip:
            summary[name] = fn()
    summary["wall_s"] = time.perf_counter() - t0
    platform.shutdown()
    path = Path(args.json) if args.json else work / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    failed = [k for k in checks if k in summary and not summary[k]["ok"]]
    log(f"summary: {path} ({summary['wall_s']:.0f} s); " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
