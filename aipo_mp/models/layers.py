"""The few torch modules the `local` layer spec needs beyond megatron-core's own:

- `RMSNorm`: Llama-style (x̂·w) and Gemma-style (x̂·(1+w), computed in fp32) RMS norms that
  also work with sequence parallelism (megatron's WrappedTorchNorm refuses it).
- `TorchCoreAttention`: causal attention with grouped-query heads, sliding windows, logit
  soft-capping and packed sequences (THD layout with cumulative sequence lengths).
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
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
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


class TorchCoreAttention(MegatronModule):
    """softmax(softcap(q·kᵀ·scale) + mask)·v for the local backend.

    Receives q [s, b, np, hn] and k, v [s, b, ng, hn] (or [t, np, hn] in the packed THD layout,
    where `packed_seq_params.cu_seqlens_q` marks sequence starts), already rotated by RoPE.
    Attention never crosses a sequence boundary; heads of a query group share their k/v.
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
    ):
        super().__init__(config=config)
        self.layer_number = layer_number  # 1-based, global across pipeline stages
        self.softmax_scale = softmax_scale or config.kv_channels**-0.5
        self.logit_softcapping = logit_softcapping
        # sliding_layers: the 1-based layer numbers that use the local window (None: all layers).
        uses_window = window_size is not None and (sliding_layers is None or layer_number in sliding_layers)
        self.window_size = window_size if uses_window else None
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        packed = query.dim() == 3
        if packed:  # [t, h, d] -> [t, 1, h, d]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        s, b, nq, hd = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        groups = nq // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        allowed = self._allowed(s, query.device, packed_seq_params, attention_mask)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        if self.logit_softcapping:
            cap = self.logit_softcapping
            scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, p=self.dropout_p)
        context = torch.matmul(probs, v)  # [b, h, s, d]
        context = context.permute(2, 0, 1, 3).reshape(s, b, nq * hd)
        return context.squeeze(1) if packed else context

    def _allowed(self, s: int, device, packed_seq_params, attention_mask) -> torch.Tensor:
        """Boolean [.., s, s]: may query i attend to key j?"""
        pos = torch.arange(s, device=device)
        allowed = pos[None, :] <= pos[:, None]
        if self.window_size is not None:
            allowed &= pos[None, :] > pos[:, None] - self.window_size
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q.to(device)
            segment = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
            allowed &= segment[None, :] == segment[:, None]
        if attention_mask is not None:  # megatron convention: True = masked out
            allowed = allowed & ~attention_mask.bool()
        return allowed


def tp_rank_and_size() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
