"""Running a built model over packed rows on any layout: the packed-sequence parameters, one
forward step in Megatron's step contract, and a forward-only pass through the pipeline schedule."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """THD layout: one row of concatenated sequences; RoPE positions restart at each start."""
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )


def model_forward(model, tokens: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int = 0,
                  padding_mask: Optional[torch.Tensor] = None):
    """tokens [1, T] -> vocab-parallel logits [1, T, V/tp] on the last stage (hidden states elsewhere).
    padding_mask [1, T] (True: padding) reaches MoE routers; megatron splits it over sequence
    parallel ranks on the first pipeline stage only, so later stages take their part here."""
    params = packed_seq_params(cu_seqlens, max_seqlen) if cu_seqlens is not None else None
    if padding_mask is None:
        return model(tokens, position_ids=None, attention_mask=None, packed_seq_params=params)
    inner = getattr(model, "module", model)
    if inner.config.sequence_parallel and not inner.pre_process:
        from megatron.core import parallel_state as ps

        padding_mask = padding_mask.chunk(ps.get_tensor_model_parallel_world_size(), dim=1)[
            ps.get_tensor_model_parallel_rank()]
    return model(tokens, position_ids=None, attention_mask=None, packed_seq_params=params, padding_mask=padding_mask)


def forward_only(chunks: list, batches: list[dict], collect: Callable[[torch.Tensor, dict], torch.Tensor],
                 seq_length: int | None = None, hidden_size: int = 0) -> None:
    """Run `batches` (dicts with tokens [1,T], cu_seqlens, max_seqlen) through the pipeline without
    gradients; `collect(logits, batch)` is called on the last stage for each micro-batch. Under
    pipeline parallelism every batch has the same T (batches.schedule_rows), which is the
    shape the stages exchange; `seq_length` is only a fallback when there are no batches."""
    seq_length = batches[0]["tokens"].shape[1] if batches else seq_length
    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model_forward(model, batch["tokens"], batch.get("cu_seqlens"), batch.get("max_seqlen", 0),
                            batch.get("padding_mask"))

        def loss_func(output):
            collect(output, batch)
            zero = output.sum() * 0.0
            return zero, {}

        return out, loss_func

    # The interleaved schedule asks every model chunk for each micro-batch: one iterator per chunk.
    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iters,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=1,
            forward_only=True,
        )
