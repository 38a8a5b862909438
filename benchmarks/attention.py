"""Core attention of the local backend on one packed row: the dense masked computation it used to
be (fp32 [heads, s, s] scores over the whole row, masked to the block diagonal) against the
per-sequence `TorchCoreAttention`, forward + backward and forward only (the reference pass).

Rows of `--seq-length` tokens (default 2560, as the issue's DPO benchmark): `short` holds pairs
of prompt 32-96 + responses 16-160 tokens (~156-token sequences, ~95 % full), `long` one pair of
~1000-token sequences (~78 % full). Padding is either listed in cu_seqlens like a sequence (what
aipo_mp.data.pairs.build_row does today: attended like one) or marked (after cu_seqlens_q[-1]:
never attended). Prints time (best of --reps, with the median), peak memory allocated during the
call (torch profiler memory events) and the bytes kept for backward beyond the inputs. The
variants run in turn within each repetition, so a machine busy with other work slows them alike.

    python benchmarks/attention.py [--seq-length 2560] [--heads 8] [--groups 8] [--head-dim 64]
                                   [--reps 3] [--threads N] [--softcap]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig

from aipo_mp.models.layers import TorchCoreAttention


def dense_masked_attention(query, key, value, scale: float, cu: torch.Tensor, softcap: Optional[float] = None):
    """The replaced local attention (packed [t, h, d] inputs): whole-row scores, masked."""
    query, key, value = (x.unsqueeze(1) for x in (query, key, value))
    s, b, nq, hd = query.shape
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
    groups = nq // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    pos = torch.arange(s)
    allowed = pos[None, :] <= pos[:, None]
    segment = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
    allowed &= segment[None, :] == segment[:, None]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).permute(2, 0, 1, 3).reshape(s, nq * hd)


def row_lengths(kind: str, seq_length: int, rng: random.Random) -> list[int]:
    lengths: list[int] = []
    while True:
        if kind == "short":
            prompt = rng.randint(32, 96)
            pair = [prompt + rng.randint(16, 160), prompt + rng.randint(16, 160)]
        else:
            prompt = rng.randint(400, 600)
            pair = [prompt + rng.randint(400, 500), prompt + rng.randint(400, 500)]
        if sum(lengths) + sum(pair) > seq_length:
            return lengths
        lengths += pair


def packed_params(cu: list[int]) -> PackedSeqParams:
    c = torch.tensor(cu, dtype=torch.int32)
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=c, cu_seqlens_kv=c, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def peak_allocated(fn) -> float:
    """MiB: the highest net allocation while fn runs (CPU allocator events of the torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def kept_for_backward(fn, inputs: torch.Tensor) -> float:
    """MiB of distinct storages autograd saves during fn, the inputs' own storage excluded."""
    storages = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() != inputs.untyped_storage().data_ptr():
            storages[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(storages.values()) / 2**20


def measure(variants: list[tuple[str, object]], fused, q, k, v, reps: int) -> list[dict]:
    """Best and median of `reps` timings per variant, the variants taken in turn within each
    repetition (so a busy machine slows them alike), then peak and kept memory."""
    def train_step(attend):
        out = attend(q, k, v)
        out.backward(torch.ones_like(out))
        fused.grad = None

    def forward_only(attend):
        with torch.no_grad():
            attend(q, k, v)

    times = {name: ([], []) for name, _ in variants}
    for name, attend in variants:
        train_step(attend)  # warm-up
    for _ in range(reps):
        for name, attend in variants:
            t0 = time.perf_counter()
            train_step(attend)
            t1 = time.perf_counter()
            forward_only(attend)
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter() - t1)
    results = []
    for name, attend in variants:
        fwd_bwd, fwd = times[name]
        results.append({"name": name, "fwd_bwd_ms": 1e3 * min(fwd_bwd), "fwd_bwd_median_ms": 1e3 * statistics.median(fwd_bwd),
                        "fwd_ms": 1e3 * min(fwd), "peak_mib": peak_allocated(lambda: train_step(attend)),
                        "kept_mib": kept_for_backward(lambda: attend(q, k, v), fused)})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-length", type=int, default=2560)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8, help="k/v heads (query groups)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--softcap", action="store_true", help="also Gemma-2 logit soft-capping (exact per-sequence path)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t, h, g, d = args.seq_length, args.heads, args.groups, args.head_dim
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; row {t} tokens, "
          f"{h} heads x {d} ({g} k/v heads)")
    print(f"{'row':6} {'attention':34} {'fwd+bwd ms':>11} {'(median)':>9} {'fwd ms':>8} {'peak MiB':>9} {'kept MiB':>9}")
    rng = random.Random(args.seed)
    config = TransformerConfig(num_layers=1, hidden_size=h * d, num_attention_heads=h, num_query_groups=g,
                               kv_channels=d, attention_dropout=0.0)
    for kind in ("short", "long"):
        lengths = row_lengths(kind, t, rng)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        real = cu[-1]
        gen = torch.Generator().manual_seed(args.seed)
        fused = torch.randn(t, g, (h // g + 2) * d, generator=gen).requires_grad_(True)
        q, k, v = torch.split(fused, [h // g * d, d, d], dim=-1)
        q = q.reshape(t, h, d)
        listed, marked = packed_params(cu + [t]), packed_params(cu)
        print(f"# {kind}: {len(lengths)} sequences, mean {real / len(lengths):.0f} tokens "
              f"(min {min(lengths)}, max {max(lengths)}), {t - real} padding; "
              f"sum L^2 / s^2 = {sum(n * n for n in lengths) / t**2:.3f} (padding listed: "
              f"{(sum(n * n for n in lengths) + (t - real) ** 2) / t**2:.3f})")
        for softcap in ((None, 50.0) if args.softcap else (None,)):
            attn = TorchCoreAttention(config, 1, logit_softcapping=softcap).eval()
            cu_listed = listed.cu_seqlens_q
            variants = [
                ("dense masked (old)", lambda q, k, v: dense_masked_attention(q, k, v, attn.softmax_scale, cu_listed, softcap)),
                ("per-sequence, padding listed", lambda q, k, v: attn(q, k, v, None, packed_seq_params=listed)),
                ("per-sequence, padding marked", lambda q, k, v: attn(q, k, v, None, packed_seq_params=marked)),
            ]
            suffix = " +softcap" if softcap else ""
            for r in measure([(name + suffix, attend) for name, attend in variants], fused, q, k, v, args.reps):
                print(f"{kind:6} {r['name']:34} {r['fwd_bwd_ms']:11.1f} {r['fwd_bwd_median_ms']:9.1f} {r['fwd_ms']:8.1f} "
                      f"{r['peak_mib']:9.1f} {r['kept_mib']:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
