"""The few torch modules the `local` layer spec needs beyond megatron-core's own:

- `RMSNorm`: Llama-style (x̂·w) and Gemma-style (x̂·(1+w), computed in fp32) RMS norms that
  also work with sequence parallelism (megatron's WrappedTorchNorm refuses it).
- `TorchCoreAttention`: causal attention with grouped-query heads, sliding windows, logit
  soft-capping, attention sinks (gpt-oss) and packed sequences (THD layout with cumulative sequence lengths), computed one
  sequence at a time so its cost follows the sequences, not the packed row.
- `RowParallelLinearWithPostNorm`: a row-parallel projection followed by an RMSNorm of its
  output, which is how Gemma-2's post-attention and post-feed-forward norms enter the spec.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.module import MegatronModule


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        init = torch.zeros if zero_centered else torch.ones
        # Created where megatron creates its own parameters: on the GPU unless CPU initialization
        # is asked for (a CPU-only norm weight inside a CUDA model fails at the first forward).
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=device))
        # With sequence parallelism each TP rank sees different tokens; megatron all-reduces the
        # grads of parameters tagged like this across the TP group.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            # Gemma: (x̂ · (1 + w)) in fp32, then cast.
            return (normed * (1.0 + self.weight.float())).type_as(x)
        # Llama/Mistral: cast x̂ first, then scale.
        return self.weight * normed.to(x.dtype)


def rms_norm_builder(zero_centered: bool):
    """A class with megatron's norm constructor signature (config, hidden_size, eps)."""

    class _Norm(RMSNorm):
        def __init__(self, config, hidden_size: int, eps: float = 1e-5):
            super().__init__(config, hidden_size, eps, zero_centered=zero_centered)

    _Norm.__name__ = "ZeroCenteredRMSNorm" if zero_centered else "RMSNorm"
    return _Norm


class RowParallelLinearWithPostNorm(RowParallelLinear):
    """RowParallelLinear whose (reduced) output goes through an RMSNorm before the residual add."""

    def __init__(self, *args, post_norm_zero_centered: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        config = kwargs["config"]
        self.post_norm = RMSNorm(
            config, config.hidden_size, config.layernorm_epsilon, zero_centered=post_norm_zero_centered
        )

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return self.post_norm(output), bias


class ExpertRowParallelLinear(RowParallelLinear):
    """An expert's output projection, fixed for expert biases (gpt-oss), two megatron 0.16.1 slips:
    - its MLP adds the bias in place (`output += bias * probs`, mlp.py); at expert-TP 1 the output
      is the TP reduction's input handed back as a view, which autograd refuses in training: the
      output is handed back as a copy (the expert's rows; small);
    - the bias is tagged `sequence_parallel` like a dense layer's, so with sequence parallelism its
      gradient would be summed over the TP group, whose ranks hold other experts (or the same
      expert's other tokens, already counted by the expert-data-parallel reduction): untagged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.bias.sequence_parallel = False

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return (output.clone() if bias is not None else output), bias


class TorchCoreAttention(MegatronModule):
    """softmax(softcap(q·kᵀ·scale) + mask)·v for the local backend, computed per sequence.

    Receives q [s, b, np, hn] and k, v [s, b, ng, hn] (or [t, np, hn] in the packed THD layout,
    where `packed_seq_params.cu_seqlens_q` marks sequence starts), already rotated by RoPE.
    Attention never crosses a sequence boundary; heads of a query group share their k/v.

    A packed row is attended one sequence at a time, so compute and the memory kept for backward
    follow the sum of the squared sequence lengths, not the row length squared:
    - without soft-capping, each sequence is one `scaled_dot_product_attention` call (is_causal, or
      a [L, L] band mask when the sliding window is shorter than the sequence; `enable_gqa` for
      grouped k/v): torch's flash kernel on CPU and GPU, which keeps only the output and an fp32
      log-sum-exp per head and token; with dropout torch falls back to its math kernel, still per
      sequence;
    - with soft-capping (Gemma-2) or sinks (gpt-oss: one learned logit per head joins each
      softmax's denominator), which no SDPA kernel expresses, the same per-sequence loop runs the
      exact unfused computation (fp32 scores, tanh cap, mask, sink column, fp32 softmax, probs in dtype).
    Padding costs nothing and its output is zero when it is marked: tokens after
    `cu_seqlens_q[-1]`, and, when `cu_seqlens_q_padded` is given (megatron/TE convention: sequence
    i's real tokens start at `cu_seqlens_q_padded[i]` and are `cu_seqlens_q[i+1] - cu_seqlens_q[i]`
    long), every token between one sequence's real end and the next padded start. A padding
    segment listed in `cu_seqlens_q` like a sequence is attended like one.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        logit_softcapping: Optional[float] = None,
        window_size: Optional[int] = None,
        sliding_layers: Optional[tuple] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        attention_sinks: bool = False,
    ):
        # k_channels / v_channels: multi-latent attention's query-key and value head sizes (they
        # differ); the output is heads x the value head size, read from the values themselves.
        super().__init__(config=config)
        self.layer_number = layer_number  # 1-based, global across pipeline stages
        self.softmax_scale = softmax_scale or config.kv_channels**-0.5
        self.logit_softcapping = logit_softcapping
        # sliding_layers: the 1-based layer numbers that use the local window (None: all layers).
        uses_window = window_size is not None and (sliding_layers is None or layer_number in sliding_layers)
        self.window_size = window_size if uses_window else None
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # gpt-oss's sinks: one learned logit per head that joins every softmax's denominator (and
        # attends nothing). Named as megatron's own learnable softmax offset; split by heads over TP.
        self.softmax_offset = sink_parameter(config) if attention_sinks else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The sinks are split over TP by heads: saved as one global [heads] tensor (dim 0 split),
        as megatron saves its own learnable softmax offset. The default would save each rank's
        heads as if replicated, so a checkpoint at TP > 1 would keep only TP rank 0's heads."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   {"softmax_offset": 0}, sharded_offsets,
                                                   tp_group=parallel_state.get_tensor_model_parallel_group(),
                                                   dp_cp_group=metadata["dp_cp_group"])

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        dropout_p = self.dropout_p if self.training else 0.0
        allow = None if attention_mask is None else ~attention_mask.bool()  # megatron: True = masked out
        if query.dim() == 4:  # [s, b, h, d]: one causal sequence per row
            s, b, nq, hd = query.shape
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
            context = self._attend(q, k, v, dropout_p, self._band(s, query.device), allow)
            return context.permute(2, 0, 1, 3).reshape(s, b, nq * value.shape[-1])
        t, nq, hd = query.shape[0], query.shape[1], value.shape[-1]  # packed THD: [t, h, d]; output [t, h * dv]
        # One split (not a slice per sequence: each slice's backward would fill a [t, h, d] zero
        # gradient) into the sequences and the padding between and after them.
        sizes, is_sequence, done = [], [], 0
        for start, end in packed_spans(packed_seq_params, t):
            if start > done:
                sizes.append(start - done)
                is_sequence.append(False)
            sizes.append(end - start)
            is_sequence.append(True)
            done = end
        if done < t:
            sizes.append(t - done)
            is_sequence.append(False)
        # The causal (and window) mask of the longest sequence: its top-left corner is any shorter one's.
        band = self._band(max((n for n, seq in zip(sizes, is_sequence) if seq), default=0), query.device)
        pieces, start = [], 0
        for q, k, v, length, attended in zip(query.split(sizes), key.split(sizes), value.split(sizes), sizes,
                                             is_sequence):
            if attended:
                q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, L, d]
                seg_band = None if band is None else band[:length, :length]
                seg_allow = None if allow is None else allow[..., start:start + length, start:start + length]
                pieces.append(self._attend(q, k, v, dropout_p, seg_band, seg_allow)[0].transpose(0, 1))  # [L, h, d]
            else:  # padding: attends nothing, output zero
                pieces.append(query.new_zeros(length, nq, hd))
            start += length
        context = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return context.reshape(t, nq * hd)

    def _band(self, length: int, device) -> Optional[torch.Tensor]:
        """Boolean [L, L], True where query i may see key j (causal, within the window), for the
        paths that need an explicit mask (soft-capping, a window shorter than L); else None."""
        window = self.window_size if self.window_size is not None and self.window_size < length else None
        if window is None and not self.logit_softcapping:
            return None
        pos = torch.arange(length, device=device)
        band = pos[None, :] <= pos[:, None]
        if window is not None:
            band &= pos[None, :] > pos[:, None] - window
        return band

    def _attend(self, q, k, v, dropout_p: float, band: Optional[torch.Tensor],
                allow: Optional[torch.Tensor]) -> torch.Tensor:
        """Causal attention within one sequence: q [b, np, L, d], k/v [b, ng, L, d] -> [b, np, L, d].
        band: this sequence's [L, L] causal/window mask, or None for plain causal attention;
        allow: an extra boolean mask broadcastable to [b, np, L, L] (True: may attend), or None."""
        if allow is not None:
            length = q.shape[-2]
            causal = band if band is not None else torch.ones(length, length, dtype=torch.bool,
                                                              device=q.device).tril()
            allow = causal & allow
        else:
            allow = band
        if self.logit_softcapping or self.softmax_offset is not None:
            if allow is None:  # plain causal
                length = q.shape[-2]
                allow = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            return self._attend_unfused(q, k, v, dropout_p, allow)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allow, dropout_p=dropout_p, is_causal=allow is None,
            scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])

    def _attend_unfused(self, q, k, v, dropout_p: float, allow: torch.Tensor) -> torch.Tensor:
        """The exact unfused computation (fp32 scores and softmax), for what SDPA cannot express:
        soft-capping, and sinks (an extra logit per head in the softmax, dropped after it)."""
        b, nq, length, hd = q.shape
        ng = k.shape[1]
        qg = q.float().reshape(b, ng, nq // ng, length, hd)  # the heads of a query group share k/v
        scores = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)) * self.softmax_scale
        cap = self.logit_softcapping
        if cap:
            scores = torch.tanh(scores / cap) * cap
        scores = torch.where(allow, scores.reshape(b, nq, length, length), float("-inf"))
        if self.softmax_offset is not None:
            sinks = self.softmax_offset.float().reshape(1, nq, 1, 1).expand(b, nq, length, 1)
            probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1].to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        context = torch.matmul(probs.reshape(b, ng, nq // ng, length, length), v.unsqueeze(2))
        return context.reshape(b, nq, length, v.shape[-1])


def sink_parameter(config) -> torch.nn.Parameter:
    """This TP rank's heads' sink logits (zeros until loaded), tagged as split over TP by heads so
    gradient norms and checkpoints count each head once."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    heads = config.num_attention_heads // parallel_state.get_tensor_model_parallel_world_size()
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
    param = torch.nn.Parameter(torch.zeros(heads, dtype=config.params_dtype, device=device))
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
    return param


def packed_spans(packed_seq_params, total: int) -> list[tuple[int, int]]:
    """[(start, end)] of each sequence's real tokens in a packed row of `total` tokens, in order;
    tokens in no span are padding. Computed once per PackedSeqParams (one host sync per forward,
    not one per layer) and cached on it."""
    if packed_seq_params is None:
        return [(0, total)]
    cu_q, padded = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_q_padded
    cached = getattr(packed_seq_params, "_aipo_spans", None)
    if cached is not None and cached[0] is cu_q and cached[1] is padded and cached[2] == total:
        return cached[3]
    cu = cu_q.tolist()
    starts = padded.tolist()[:-1] if padded is not None else cu[:-1]
    spans, done = [], 0
    for start, a, b in zip(starts, cu[:-1], cu[1:]):
        end = min(start + b - a, total)
        if end <= start:
            continue
        if start < done:
            raise ValueError(f"packed sequences overlap or are out of order: cu_seqlens_q={cu}"
                             + (f", cu_seqlens_q_padded={padded.tolist()}" if padded is not None else ""))
        spans.append((start, end))
        done = end
    packed_seq_params._aipo_spans = (cu_q, padded, total, spans)
    return spans


def tp_rank_and_size() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
