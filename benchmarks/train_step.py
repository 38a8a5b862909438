"""Training-step throughput of `aipo-mp train`: tokens/s, token utilization, peak memory, model
TFLOP/s and, on a GPU, MFU.

Builds a random-weight HF checkpoint of a model config (optionally a slice: fewer layers, or
shrunk by --scale for a CPU), a tokenizer of exactly its vocabulary size and a pairs JSONL, then
runs the real trainer (`python -m aipo_mp.cli train ... --nproc-per-node N`, objective aipo,
reference.mode=initial) and reads its metrics.jsonl. The first --warmup-steps steps are left
out of every number.

    python benchmarks/train_step.py --steps 6 --warmup-steps 2 --nproc 2 --tp 2     # tiny Llama, CPU
    python benchmarks/train_step.py --model-config configs/models/mistral_large_123b.yaml \\
        --layers 1 --scale 0.125 --seq-length 1024 --global-batch-pairs 8            # CPU-sized slice
    python benchmarks/train_step.py --model-config configs/models/mistral_large_123b.yaml \\
        --layers 2 --dtype bf16                                                        # one GPU

What the numbers are:
  tokens/s      real (non-padding) tokens of the global batch / step_time_s, as the trainer logs
                them; median over the timed steps, whole job (all ranks together).
  model FLOP/s  3·F per real token (forward + backward), F = aipo_mp.planner.forward_flops_per_token
                (2·N + attention), with the attention length taken from the data's actual sequence
                lengths (sum l² / sum l). The reference forward (F once per pair) runs before step 1
                and is not inside step_time_s, so it is not counted (the planner amortises it).
  MFU           model FLOP/s / (ranks · the GPU's bf16 dense peak from aipo_mp.planner.GPUS).
  core attention  the share of the step spent in the local backend's core attention
                (`TorchCoreAttention`, forward + backward), timed inside the ranks by
                benchmarks/attention_probe.py (loaded only for this run; --no-attention-share
                leaves it out); median over the timed steps of (mean over ranks) / step_time_s.
                n/a with the Transformer Engine backend, whose core attention is TE's.
  peak memory   sampled from outside (the trainer logs none): RSS of the rank processes (psutil),
                and on a GPU `nvidia-smi memory.used` minus its value before the run (includes the
                CUDA context and the caching allocator's reserve, so above max_memory_allocated).
                "steps" = only while the timed steps run; "run" = loading, reference pass, save too.
--scale multiplies hidden size, FFN size and head_dim; head counts, kv heads and the vocabulary
stay (so TP layouts that divide the real model still divide the slice).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from aipo_mp.models import num_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9


# ---------------------------------------------------------------------------------------------
# Model slice, checkpoint, data
# ---------------------------------------------------------------------------------------------


def load_arch(path: str, layers: int, scale: float):
    from aipo_mp.config import config_from_dict, load_yaml_with_defaults

    path = Path(path) if Path(path).exists() else ROOT / path  # repo-relative also from elsewhere
    arch = config_from_dict({"model": load_yaml_with_defaults(path)["model"]}).model.arch
    changes = {}
    if layers:
        changes["num_layers"] = layers
        if arch.layer_types:
            changes["layer_types"] = (arch.layer_types * layers)[:layers]
        changes["dense_layers"] = [i for i in arch.dense_layers if i < layers]
    if scale != 1.0:
        def scaled(v, mult):
            return max(mult, int(round(v * scale / mult)) * mult)

        hd = scaled(arch.head_dim, 8)
        if arch.num_experts:
            changes["moe_intermediate_size"] = scaled(arch.moe_intermediate_size, 64)
        changes.update(head_dim=hd, intermediate_size=scaled(arch.intermediate_size, 64),
                       hidden_size=arch.num_attention_heads * hd if arch.hidden_size == arch.num_attention_heads
                       * arch.head_dim else scaled(arch.hidden_size, 64))
        if arch.query_pre_attn_scalar:
            changes["query_pre_attn_scalar"] = arch.query_pre_attn_scalar * hd / arch.head_dim
    return dataclasses.replace(arch, **changes)


def build_checkpoint(arch, work: Path) -> Path:
    from aipo_mp.testing.hf_build import save_hf_model
    from aipo_mp.testing.tiny import build_tiny_tokenizer

    t0 = time.perf_counter()
    tok = build_tiny_tokenizer(work / f"tokenizer_{arch.vocab_size}", vocab_size=arch.vocab_size)
    name = "_".join(str(getattr(arch, k)) for k in ("family", "num_layers", "hidden_size", "intermediate_size",
                                                     "num_attention_heads", "num_key_value_heads", "head_dim",
                                                     "vocab_size", "num_experts", "moe_intermediate_size"))
    model = save_hf_model(arch, work / f"hf_{name}", tokenizer_dir=tok)
    print(f"checkpoint: {model} ({time.perf_counter() - t0:.1f} s incl. cache check)", flush=True)
    return model


def chat_records(n: int, tokenizer, max_len: int, seed: int) -> list[dict]:
    """Random-word text whose token counts follow aipo_mp.data.pairs.synthetic_chat_lengths
    (prompt + response clipped to max_len, so nothing is truncated)."""
    from aipo_mp.data.pairs import synthetic_chat_lengths
    from aipo_mp.testing.synthetic import WORDS
    from aipo_mp.testing.tiny import COMMON_WORDS

    words = sorted(set(WORDS) | set(COMMON_WORDS))
    cost = dict(zip(words, map(len, tokenizer(words, add_special_tokens=False)["input_ids"])))
    rng = random.Random(seed)

    def text(tokens: int) -> str:  # random words adding up to about `tokens` tokens, at least one word
        out, used = [], 0
        while True:
            w = rng.choice(words)
            if out and used + cost[w] > tokens:
                return " ".join(out)
            out.append(w)
            used += cost[w]

    max_prompt = min(512, max_len // 2)
    lengths = synthetic_chat_lengths(n, seed, max_prompt=max_prompt, max_response=min(512, max_len - max_prompt))
    # BOS is added to the prompt and EOS to each response by the trainer's tokenization.
    return [{"prompt": text(p - 1), "chosen": text(c - 1), "rejected": text(r - 1)} for p, c, r in lengths]


def write_pairs(args, tokenizer, path: Path, max_len: int):
    """Writes the pairs JSONL; returns the pairs as the trainer will tokenize them."""
    from aipo_mp.data.pairs import DataStats, tokenize_pairs
    from aipo_mp.testing.synthetic import marker_pairs, write_jsonl

    n = args.steps * args.global_batch_pairs  # one epoch: every pair trained on once
    rows = chat_records(n, tokenizer, max_len, args.seed) if args.pairs_dist == "chat" else marker_pairs(n, args.seed)
    write_jsonl(rows, path)
    stats = DataStats()
    pairs = tokenize_pairs(rows, tokenizer, max_len, max_len // 2, stats)  # as the trainer will (train_config)
    if stats.truncated or len(pairs) != n:
        print(f"note: tokenization changed the data: {stats.to_dict()}")
    return pairs


def flops_per_token(arch, pairs) -> tuple[float, float]:
    """(forward FLOPs per real token, attention length used): the planner's formula with the
    token-weighted mean sequence length of the data (each sequence = prompt + one response)."""
    from aipo_mp.planner import forward_flops_per_token

    lens = [len(p.prompt) + len(r) for p in pairs for r in (p.chosen, p.rejected)]
    s_eff = sum(l * l for l in lens) / sum(lens)
    return forward_flops_per_token(arch, 2 * s_eff), s_eff  # the planner uses seq_length / 2 per sequence


# ---------------------------------------------------------------------------------------------
# Hardware and memory sampling
# ---------------------------------------------------------------------------------------------


def nvidia_smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.strip().splitlines() if out.returncode == 0 else []


def detect_gpu(override: str | None):
    """(GPU name or None, planner GPUSpec or None)."""
    import torch

    if not torch.cuda.is_available():  # no CUDA context is created here
        return None, None
    from aipo_mp.planner import GPUS

    name = (nvidia_smi("name") or ["unknown GPU"])[0]
    key = override or next((k for k in GPUS if k.split("-")[0] in name.lower()), None)
    return name, GPUS.get(key)


class MemorySampler(threading.Thread):
    """Polls the RSS of the launcher's child processes (the ranks) and, on a GPU, nvidia-smi. Peaks are kept
    for the whole run and for the window in which metrics.jsonl has lo <= lines < hi (timed steps)."""

    def __init__(self, pid: int, metrics: Path, lo: int, hi: int, gpu: bool):
        super().__init__(daemon=True)
        self.pid, self.metrics, self.lo, self.hi, self.gpu = pid, metrics, lo, hi, gpu
        self.base = [float(x) for x in nvidia_smi("memory.used")] if gpu else []
        self.peak = {w: {"rank_rss": 0, "total_rss": 0, "gpu_used_mib": 0.0} for w in ("run", "steps")}
        self.done = threading.Event()

    def steps_window(self) -> bool:
        try:
            return self.lo <= self.metrics.read_bytes().count(b"\n") < self.hi
        except OSError:
            return False

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            rss = []
            try:
                for p in root.children():  # the ranks (not the short-lived checkpoint writers they fork)
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            used = [float(x) - b for x, b in zip(nvidia_smi("memory.used"), self.base)] if self.gpu else []
            sample = {"rank_rss": max(rss, default=0), "total_rss": sum(rss), "gpu_used_mib": max(used, default=0.0)}
            for w in ("run", "steps") if self.steps_window() else ("run",):
                for k, v in sample.items():
                    self.peak[w][k] = max(self.peak[w][k], v)
            self.done.wait(0.5 if self.gpu else 0.2)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train_config(args, model: Path, data: Path, out: Path, max_len: int, dtype: str) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_length": max_len, "max_prompt_length": max_len // 2, "shuffle": True},
        "parallel": {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "sequence_parallel": args.tp > 1},
        "precision": {"dtype": dtype},
        "objective": {"name": "aipo"},
        "reference": {"mode": "initial"},
        "train": {"steps": args.steps, "global_batch_pairs": args.global_batch_pairs, "seq_length": args.seq_length,
                  "lr": 1e-6, "save_every": 0, "seed": args.seed},
        "output": {"dir": str(out), "tensorboard": False},
    }


def run_trainer(args, cfg: dict, work: Path, gpu: bool) -> tuple[list[dict], dict, float]:
    out = Path(cfg["output"]["dir"])
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint there would make the trainer resume
    cfg_path = work / "bench_train.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    log = work / "train.log"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    shutil.rmtree(work / "attention_probe", ignore_errors=True)
    if args.attention_share:  # the ranks load the probe through a sitecustomize first on their path
        import attention_probe

        env["PYTHONPATH"] = attention_probe.write_sitecustomize(work / "probe_site") + os.pathsep + env["PYTHONPATH"]
        env["AIPO_BENCH_ATTENTION_DIR"] = str(work / "attention_probe")
        if args.profile_step:
            env["AIPO_BENCH_PROFILE_STEP"] = str(args.profile_step)
        (work / "attention_probe").mkdir()
    cmd = [sys.executable, "-m", "aipo_mp.cli", "train", str(cfg_path), "--nproc-per-node", str(args.nproc)]
    print("running: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        sampler = MemorySampler(proc.pid, out / "metrics.jsonl", max(1, args.warmup_steps), args.steps, gpu)
        sampler.start()
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if code:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"trainer failed with exit code {code}; last lines of {log}:\n" + "\n".join(tail))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records, sampler.peak, wall


def attention_share(work: Path, timed: list[dict], warmup: int) -> dict | None:
    """Core attention's share of the timed steps (benchmarks/attention_probe.py), or None."""
    import attention_probe

    per_rank = {r: steps[warmup:warmup + len(timed)] for r, steps in attention_probe.read(str(work / "attention_probe")).items()}
    per_rank = {r: s for r, s in per_rank.items() if len(s) == len(timed)}
    if not per_rank or not any(x["calls"] for s in per_rank.values() for x in s):
        return None
    ranks = len(per_rank)
    fwd = [sum(per_rank[r][i]["fwd_s"] for r in per_rank) / ranks for i in range(len(timed))]
    bwd = [sum(per_rank[r][i]["bwd_s"] for r in per_rank) / ranks for i in range(len(timed))]
    shares = [(f + b) / rec["step_time_s"] for f, b, rec in zip(fwd, bwd, timed)]
    ref = max(s[-1]["reference_fwd_s"] for s in per_rank.values())
    return {"share": statistics.median(shares), "fwd_s_per_step": statistics.mean(fwd),
            "bwd_s_per_step": statistics.mean(bwd), "calls_per_step_per_rank":
            statistics.mean(x["calls"] for s in per_rank.values() for x in s), "ranks": ranks,
            "reference_pass_s": ref}


def main() -> int:
    from aipo_mp.planner import GPUS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", default="configs/models/tiny_llama.yaml")
    ap.add_argument("--layers", type=int, default=0, help="override num_layers (a slice); 0: the config's")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply hidden, FFN and head_dim (CPU-sized slices)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1, help="expert parallel (MoE configs)")
    ap.add_argument("--etp", type=int, default=1, help="expert tensor parallel (MoE configs)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (GPUs); dp = nproc / (tp x pp)")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--global-batch-pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=3, help="first steps, left out of the numbers")
    ap.add_argument("--pairs-dist", choices=["chat", "marker"], default="chat",
                    help="chat: lengths like chat preference data (median prompt 60, response 150 tokens); "
                         "marker: the short demo pairs")
    ap.add_argument("--gpu", choices=sorted(GPUS), default=None,
                    help="GPU whose bf16 peak the MFU uses (default: matched from the nvidia-smi name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_train_step"),
                    help="work directory; checkpoints and tokenizers there are reused")
    ap.add_argument("--json", default=None, help="also write the summary to this file")
    ap.add_argument("--attention-share", action=argparse.BooleanOptionalAction, default=True,
                    help="time the core attention inside the ranks (benchmarks/attention_probe.py)")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="torch.profiler of this step (>= 2) in every rank: WORK/attention_probe/profile_rank*.txt")
    args = ap.parse_args()
    if args.profile_step and not (2 <= args.profile_step <= args.steps and args.attention_share):
        ap.error("--profile-step needs 2 <= N <= --steps and the attention probe (no --no-attention-share)")
    if not 0 <= args.warmup_steps < args.steps:
        ap.error("need 0 <= --warmup-steps < --steps")

    from transformers import AutoTokenizer

    from aipo_mp.planner import compute_params

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    gpu_name, gpu_spec = detect_gpu(args.gpu)
    dtype = args.dtype or ("bf16" if gpu_name else "fp32")
    arch = load_arch(args.model_config, args.layers, args.scale)
    print(f"model: {arch.family} {arch.num_layers} layers, hidden {arch.hidden_size}, FFN {arch.intermediate_size}, "
          f"heads {arch.num_attention_heads}/{arch.num_key_value_heads} x {arch.head_dim}, vocab {arch.vocab_size}: "
          f"{num_params(arch) / 1e9:.3f}B params"
          + (f" ({num_params(arch, active=True) / 1e9:.3f}B active: {arch.num_experts} experts of "
             f"{arch.moe_intermediate_size}, top-{arch.num_experts_per_tok})" if arch.num_experts else ""), flush=True)
    model = build_checkpoint(arch, work)

    max_len = args.seq_length // 2
    data = work / f"pairs_{args.pairs_dist}_{args.steps * args.global_batch_pairs}_{max_len}.jsonl"
    pairs = write_pairs(args, AutoTokenizer.from_pretrained(str(model)), data, max_len)
    f_fwd, s_eff = flops_per_token(arch, pairs)
    mean = [statistics.mean(len(getattr(p, k)) for p in pairs) for k in ("prompt", "chosen", "rejected")]
    print(f"data: {len(pairs)} pairs ({args.pairs_dist}), mean prompt/chosen/rejected {mean[0]:.0f}/{mean[1]:.0f}/"
          f"{mean[2]:.0f} tokens, {statistics.mean(p.num_tokens for p in pairs):.0f} per pair", flush=True)

    cfg = train_config(args, model, data, work / "train_out", max_len, dtype)
    records, peak, wall = run_trainer(args, cfg, work, bool(gpu_name))
    timed = [r for r in records if r["step"] > args.warmup_steps]
    if len(records) != args.steps or not timed:
        raise SystemExit(f"expected {args.steps} steps in metrics.jsonl, found {len(records)}")

    tps = statistics.median(r["tokens_per_s"] for r in timed)
    step_s = statistics.median(r["step_time_s"] for r in timed)
    util = statistics.mean(r["token_utilization"] for r in timed)
    tflops = 3 * f_fwd * tps / 1e12
    mfu = tflops / (args.nproc * gpu_spec.peak_tflops) if gpu_spec else None
    dp = args.nproc // (args.tp * args.pp)
    summary = {
        "model_config": args.model_config, "arch": dataclasses.asdict(arch), "params": num_params(arch),
        "flops_params": compute_params(arch), "device": gpu_name or "cpu", "dtype": dtype,
        "tp": args.tp, "pp": args.pp, "dp": dp, "nproc": args.nproc, "seq_length": args.seq_length,
        "global_batch_pairs": args.global_batch_pairs, "pairs_dist": args.pairs_dist,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "timed_steps": len(timed),
        "tokens_per_s": tps, "tokens_per_s_per_rank": tps / args.nproc, "step_time_s": step_s,
        "step_time_s_min_max": [min(r["step_time_s"] for r in timed), max(r["step_time_s"] for r in timed)],
        "token_utilization": util, "forward_flops_per_token": f_fwd, "attention_seq_len": s_eff,
        "model_tflops": tflops, "model_tflops_per_rank": tflops / args.nproc,
        "mfu": mfu, "gpu_peak_tflops": gpu_spec.peak_tflops if gpu_spec else None,
        "peak_rank_rss_gb": {w: peak[w]["rank_rss"] / GB for w in peak},
        "peak_total_rss_gb": {w: peak[w]["total_rss"] / GB for w in peak},
        "peak_gpu_used_gib": {w: peak[w]["gpu_used_mib"] / 1024 for w in peak} if gpu_name else None,
        "trainer_wall_s": wall,
        "core_attention": attention_share(work, timed, args.warmup_steps) if args.attention_share else None,
    }

    print(f"\n== {arch.family} {arch.num_layers}L h{arch.hidden_size}, {dtype}, tp={args.tp} pp={args.pp} dp={dp}"
          + (f" ep={args.ep} etp={args.etp}" if arch.num_experts else "") + " on "
          f"{args.nproc} x {gpu_name or 'CPU rank'}, seq {args.seq_length}, {args.global_batch_pairs} pairs/step, "
          f"{len(timed)} timed steps (+{args.warmup_steps} warm-up) ==")
    lo, hi = summary["step_time_s_min_max"]
    print(f"step time          {step_s:.3f} s median ({lo:.3f}-{hi:.3f})")
    print(f"tokens/s           {tps:,.0f} (job), {tps / args.nproc:,.0f} per rank")
    print(f"token utilization  {util:.3f}")
    print(f"peak RSS           per rank {peak['steps']['rank_rss'] / GB:.2f} GB, all ranks "
          f"{peak['steps']['total_rss'] / GB:.2f} GB during the steps (whole run: {peak['run']['rank_rss'] / GB:.2f} / "
          f"{peak['run']['total_rss'] / GB:.2f} GB)")
    if gpu_name:
        print(f"peak GPU memory    {summary['peak_gpu_used_gib']['steps']:.2f} GiB nvidia-smi memory.used above idle, "
              f"busiest GPU, during the steps (whole run {summary['peak_gpu_used_gib']['run']:.2f} GiB)")
    print(f"model FLOPs        3 x {f_fwd / 1e9:.4g} GFLOP per token (N = {compute_params(arch) / 1e9:.3f}B, "
          f"attention length {s_eff:.0f})")
    print(f"model TFLOP/s      {tflops:.4g} (job), {tflops / args.nproc:.4g} per rank")
    if mfu is not None:
        print(f"MFU                {mfu:.1%} of {gpu_spec.peak_tflops:.0f} TFLOP/s bf16 dense per GPU ({gpu_spec.name})"
              + ("" if dtype == "bf16" else "; the run is fp32, so this understates the bf16 path"))
    elif gpu_name:
        print(f"MFU                n/a: {gpu_name} is not in aipo_mp.planner.GPUS (pass --gpu)")
    else:
        print("MFU                n/a on CPU")
    att = summary["core_attention"]
    if att:
        print(f"core attention     {att['share']:.1%} of the step (median): forward {att['fwd_s_per_step']:.3f} s + "
              f"backward {att['bwd_s_per_step']:.3f} s per step and rank, {att['calls_per_step_per_rank']:.0f} calls; "
              f"{att['reference_pass_s']:.2f} s of the reference pass")
    elif args.attention_share:
        print("core attention     n/a: the probe saw no TorchCoreAttention call (Transformer Engine backend?)")
    for prof in sorted((work / "attention_probe").glob("profile_rank*.txt")):
        print(f"profile of step {args.profile_step}: {prof}")
    line = json.dumps(summary)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
