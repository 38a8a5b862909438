"""The local backend's per-sequence core attention (`TorchCoreAttention`) equals the dense masked
computation it replaced (a [b, heads, s, s] fp32 score matrix over the whole row, masked to the
block diagonal), forward and gradients in fp32 to <= 1e-6, for causal, sliding-window, soft-capped
and grouped-query attention on packed rows (several sequences of different lengths, padding listed
as a segment, padding after cu_seqlens_q[-1], padding marked by cu_seqlens_q_padded) and on the
unpacked [s, b, h, d] layout; its work is one kernel call per sequence, padding is never attended,
and nothing of the row's squared size is kept for backward."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig

from aipo_mp.models import layers
from aipo_mp.models.layers import TorchCoreAttention, packed_spans

TOL = 1e-6
HEAD_DIM = 16


def dense_reference(query, key, value, scale: float, cu: Optional[torch.Tensor], window: Optional[int] = None,
                    softcap: Optional[float] = None, attention_mask=None) -> torch.Tensor:
    """The replaced TorchCoreAttention.forward (eval mode), verbatim in substance: scores over the
    whole row, masked to causal ∧ window ∧ same segment (segments from cu, positions after cu[-1]
    forming one more segment) ∧ ~attention_mask."""
    packed = query.dim() == 3
    if packed:
        query, key, value = (x.unsqueeze(1) for x in (query, key, value))
    s, b, nq, hd = query.shape
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
    groups = nq // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    pos = torch.arange(s)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    if cu is not None:
        segment = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
        allowed &= segment[None, :] == segment[:, None]
    if attention_mask is not None:
        allowed = allowed & ~attention_mask.bool()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    context = torch.matmul(probs, v).permute(2, 0, 1, 3).reshape(s, b, nq * hd)
    return context.squeeze(1) if packed else context


def make_attention(heads: int, groups: int, window=None, softcap=None, sliding_layers=None, layer_number=1,
                   dropout: float = 0.0) -> TorchCoreAttention:
    config = TransformerConfig(num_layers=2, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=HEAD_DIM, attention_dropout=dropout)
    attn = TorchCoreAttention(config, layer_number, logit_softcapping=softcap, window_size=window,
                              sliding_layers=sliding_layers)
    return attn.eval()


def qkv(shape_prefix: tuple, heads: int, groups: int, seed: int = 0):
    """q, k, v as megatron hands them over: non-contiguous views of one fused projection output."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(*shape_prefix, groups, (heads // groups + 2) * HEAD_DIM, generator=gen) * 0.5
    fused.requires_grad_(True)
    q, k, v = torch.split(fused, [heads // groups * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=-1)
    q = q.reshape(*shape_prefix, heads, HEAD_DIM)
    return fused, q, k, v


def params(cu: list[int], padded: Optional[list[int]] = None) -> PackedSeqParams:
    c = torch.tensor(cu, dtype=torch.int32)
    p = None if padded is None else torch.tensor(padded, dtype=torch.int32)
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=c, cu_seqlens_kv=c, cu_seqlens_q_padded=p,
                           cu_seqlens_kv_padded=p, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


def upstream_grad(out: torch.Tensor) -> torch.Tensor:
    """A random output gradient, scaled (like the inputs) so that outputs and gradients are O(1):
    there 1e-6 is a few fp32 ulps, the distance between two exact summation orders."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(99)) * 0.25


def grads(out: torch.Tensor, tensors, upstream: torch.Tensor):
    return torch.autograd.grad(out, tensors, upstream)


def assert_close(got, want, what: str) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{what}: max |diff| {diff:.2e} > {TOL}"


# Sequences of 23, 9, 31, 1 and 14 tokens, then 6 tokens of padding listed as one more segment
# (as aipo_mp.data.pairs.build_row packs a row).
ROW = [0, 23, 32, 63, 64, 78, 84]
CASES = {
    "causal": dict(heads=4, groups=4),
    "gqa": dict(heads=4, groups=2),
    "mqa": dict(heads=4, groups=1),
    "window": dict(heads=4, groups=2, window=8),  # shorter than 3 of the sequences, longer than 2
    "softcap": dict(heads=4, groups=4, softcap=2.0),  # a small cap, so the tanh matters
    "softcap_window_gqa": dict(heads=4, groups=2, window=8, softcap=2.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_dense(case):
    c = CASES[case]
    attn = make_attention(c["heads"], c["groups"], c.get("window"), c.get("softcap"))
    fused, q, k, v = qkv((ROW[-1],), c["heads"], c["groups"])
    cu = torch.tensor(ROW, dtype=torch.int32)
    got = attn(q, k, v, None, packed_seq_params=params(ROW))
    want = dense_reference(q, k, v, attn.softmax_scale, cu, c.get("window"), c.get("softcap"))
    assert got.shape == want.shape == (ROW[-1], c["heads"] * HEAD_DIM)
    assert_close(got, want, f"{case} output")
    upstream = upstream_grad(want)
    for name, g, w in zip("qkv", grads(got, (q, k, v), upstream), grads(want, (q, k, v), upstream)):
        assert_close(g, w, f"{case} d{name}")


@pytest.mark.parametrize("case", ["causal", "gqa", "window", "softcap_window_gqa"])
@pytest.mark.parametrize("marking", ["tail", "padded"])
def test_marked_padding_is_zero_and_free(case, marking):
    """Padding after cu_seqlens_q[-1], or between sequences per cu_seqlens_q_padded: real tokens
    equal the dense computation, padding outputs are zero and get no gradient."""
    c = CASES[case]
    attn = make_attention(c["heads"], c["groups"], c.get("window"), c.get("softcap"))
    t = 90
    if marking == "tail":  # 78 real tokens, 12 of padding not listed in cu_seqlens_q
        p, dense_cu = params(ROW[:-1]), torch.tensor(ROW[:-1], dtype=torch.int32)
        real = torch.arange(t) < ROW[-2]
    else:  # sequences of 20, 9, 25 and 14 tokens, each padded to a multiple of 8 (TE's layout)
        cu, padded = [0, 20, 29, 54, 68], [0, 24, 40, 72, 88]
        p, dense_cu = params(cu, padded), torch.tensor(padded, dtype=torch.int32)
        real = torch.zeros(t, dtype=torch.bool)
        for start, a, b in zip(padded[:-1], cu[:-1], cu[1:]):
            real[start:start + b - a] = True
    fused, q, k, v = qkv((t,), c["heads"], c["groups"], seed=1)
    got = attn(q, k, v, None, packed_seq_params=p)
    want = dense_reference(q, k, v, attn.softmax_scale, dense_cu, c.get("window"), c.get("softcap"))
    assert_close(got[real], want[real], f"{marking} {case} real tokens")
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))
    upstream = upstream_grad(want) * real[:, None]
    for name, g, w in zip("qkv", grads(got, (q, k, v), upstream), grads(want, (q, k, v), upstream)):
        assert_close(g, w, f"{marking} {case} d{name}")
        assert torch.equal(g[~real], torch.zeros_like(g[~real])), f"padding got a gradient in d{name}"


@pytest.mark.parametrize("case", list(CASES))
def test_unpacked_equals_dense(case):
    """[s, b, h, d] without packed_seq_params: plain causal attention over each whole row."""
    c = CASES[case]
    attn = make_attention(c["heads"], c["groups"], c.get("window"), c.get("softcap"))
    s, b = 37, 2
    fused, q, k, v = qkv((s, b), c["heads"], c["groups"], seed=2)
    got = attn(q, k, v, None)
    want = dense_reference(q, k, v, attn.softmax_scale, None, c.get("window"), c.get("softcap"))
    assert got.shape == want.shape == (s, b, c["heads"] * HEAD_DIM)
    assert_close(got, want, f"unpacked {case} output")
    upstream = upstream_grad(want)
    for name, g, w in zip("qkv", grads(got, (q, k, v), upstream), grads(want, (q, k, v), upstream)):
        assert_close(g, w, f"unpacked {case} d{name}")


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_attention_mask_equals_dense(softcap):
    """An explicit megatron attention mask (True: masked out) still applies on top of causality."""
    attn = make_attention(4, 2, softcap=softcap)
    s, b = 21, 2
    fused, q, k, v = qkv((s, b), 4, 2, seed=3)
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[0, :, :, :3] = True  # row 0: the first 3 keys are hidden (query 0-2 then see nothing ... )
    mask[0, :, :3, :] = False  # ... except from themselves, so no row is empty
    mask[1, :, 10:, 4:8] = True
    got = attn(q, k, v, mask)
    want = dense_reference(q, k, v, attn.softmax_scale, None, None, softcap, attention_mask=mask)
    assert_close(got, want, "masked output")
    upstream = upstream_grad(want)
    for name, g, w in zip("qkv", grads(got, (q, k, v), upstream), grads(want, (q, k, v), upstream)):
        assert_close(g, w, f"masked d{name}")


def test_sliding_layers_select_the_window():
    window_layer = make_attention(4, 2, window=8, sliding_layers=(2,), layer_number=2)
    global_layer = make_attention(4, 2, window=8, sliding_layers=(2,), layer_number=1)
    assert window_layer.window_size == 8 and global_layer.window_size is None
    fused, q, k, v = qkv((ROW[-1],), 4, 2, seed=4)
    cu = torch.tensor(ROW, dtype=torch.int32)
    for attn, window in ((window_layer, 8), (global_layer, None)):
        got = attn(q, k, v, None, packed_seq_params=params(ROW))
        assert_close(got, dense_reference(q, k, v, attn.softmax_scale, cu, window), f"window={window}")


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_dropout_when_training(softcap):
    """attention_dropout > 0 drops attention probabilities in training mode only; padding stays
    zero; eval mode equals the dense computation."""
    attn = make_attention(4, 2, softcap=softcap, dropout=0.5)
    fused, q, k, v = qkv((90,), 4, 2, seed=5)
    p = params(ROW[:-1])  # 12 tokens of trailing padding
    real = torch.arange(90) < ROW[-2]
    evaluated = attn(q, k, v, None, packed_seq_params=p)
    want = dense_reference(q, k, v, attn.softmax_scale, torch.tensor(ROW[:-1]), None, softcap)
    assert_close(evaluated[real], want[real], "eval output with attention_dropout set")
    attn.train()
    torch.manual_seed(0)
    dropped = attn(q, k, v, None, packed_seq_params=p)
    assert torch.isfinite(dropped).all()
    assert (dropped[real] - evaluated[real]).abs().max() > 1e-2, "no dropout applied in training mode"
    assert torch.equal(dropped[~real], torch.zeros_like(dropped[~real]))
    dq, dk, dv = grads(dropped, (q, k, v), torch.ones_like(dropped))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    attn.eval()


def test_one_kernel_call_per_sequence_and_none_for_padding(monkeypatch):
    """The work is one SDPA call per sequence, of that sequence's length; padding gets none."""
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append((q.shape[-2], k.shape[-2], kwargs.get("is_causal"), kwargs.get("enable_gqa")))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recording)
    attn = make_attention(4, 2)
    fused, q, k, v = qkv((90,), 4, 2, seed=6)
    attn(q, k, v, None, packed_seq_params=params([0, 20, 29, 54, 68], [0, 24, 40, 72, 88]))
    assert calls == [(20, 20, True, True), (9, 9, True, True), (25, 25, True, True), (14, 14, True, True)]


def test_nothing_of_the_row_squared_is_kept_for_backward():
    """Per-sequence attention keeps O(tokens + Σ L²) for backward, never a [.., t, t] tensor
    (the dense computation kept fp32 scores and probabilities over the whole row)."""
    t, seg = 512, 32
    cu = list(range(0, t + 1, seg))
    for softcap in (None, 2.0):
        attn = make_attention(2, 1, softcap=softcap)
        fused, q, k, v = qkv((t,), 2, 1, seed=7)
        largest = []

        def pack(x):
            largest.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            attn(q, k, v, None, packed_seq_params=params(cu))
        # the inputs (t·heads·d elements) are the largest saved tensors; Σ L² per head is 16 · 32² · 2
        assert max(largest) <= fused.numel() and max(largest) < t * t, (softcap, max(largest))


def test_packed_spans():
    assert packed_spans(None, 10) == [(0, 10)]
    assert packed_spans(params([0, 4, 4, 9]), 12) == [(0, 4), (4, 9)]  # empty sequence skipped, tail padding
    assert packed_spans(params([0, 3, 5], [0, 4, 8]), 8) == [(0, 3), (4, 6)]
    p = params([0, 5, 10])
    assert packed_spans(p, 10) is packed_spans(p, 10)  # cached per forward: one host sync, not one per layer
    with pytest.raises(ValueError, match="overlap"):
        packed_spans(params([0, 5, 10], [0, 3, 8]), 10)
    assert math.isclose(make_attention(4, 2).softmax_scale, HEAD_DIM**-0.5)
