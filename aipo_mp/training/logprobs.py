"""Per-token and per-sequence log-probabilities from logits split over the vocabulary across
tensor-parallel ranks (megatron's vocab-parallel cross entropy: no rank ever holds the whole
vocabulary). The trainer and the reference pass both call `sequence_logprobs`."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def token_logprobs(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t]) for every position, in fp32. Logits [..., V/tp], labels [...]."""
    logits = vocab_parallel_logits.float()
    if logits is vocab_parallel_logits:
        # The cross entropy subtracts the max in place on an fp32 input; keep the caller's logits.
        logits = logits.clone()
    return -vocab_parallel_cross_entropy(logits, labels, 0.0)


def sequence_logprobs(token_lp: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor,
                      num_sequences: int) -> torch.Tensor:
    """Sum of masked token log-probs per sequence, accumulated in fp32.

    Packed layout: token_lp, loss_mask, segment_ids are [T] (one row; segment -1 = padding).
    Padded layout: [B, S] with segment_ids[b, :] = b. Returns [num_sequences]."""
    lp = token_lp.float().reshape(-1)
    mask = loss_mask.reshape(-1).bool() & (segment_ids.reshape(-1) >= 0)
    seg = segment_ids.reshape(-1).clamp(min=0)
    out = torch.zeros(num_sequences, dtype=torch.float32, device=lp.device)
    return out.index_add(0, seg, torch.where(mask, lp, torch.zeros_like(lp)))


def padded_segment_ids(batch: int, seq: int, device=None) -> torch.Tensor:
    return torch.arange(batch, device=device)[:, None].expand(batch, seq)


def gather_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from the TP shards. For verification on small models only: the
    training path never gathers the vocabulary."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
