"""One rank of the vocab-parallel log-prob check: for TP sizes dividing the world, per-token
log-probs and their gradients w.r.t. the logits equal a single-process log_softmax gather (fp32),
in the padded [B, S] and the packed [T] layouts. argv: results.json"""

import json
import sys

import torch

from aipo_mp.runtime import platform
from aipo_mp.training.logprobs import padded_segment_ids, sequence_logprobs, token_logprobs


def check(tp: int, shape: tuple, vocab: int = 64) -> dict:
    from megatron.core import parallel_state

    platform.initialize_model_parallel(tp, 1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(7)
    full = torch.randn(*shape, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    if len(shape) == 1:  # packed row: three sequences then padding
        segments = torch.tensor([0] * 5 + [1] * 7 + [2] * 4 + [-1] * (shape[0] - 16))
        n = 3
    else:
        segments, n = padded_segment_ids(*shape), shape[0]
    weights = torch.randn(n, generator=g)

    # Single-process reference.
    ref_logits = full.clone().requires_grad_(True)
    ref_tok = torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None])[..., 0]
    ref_seq = sequence_logprobs(ref_tok, mask, segments, n)
    (ref_seq * weights).sum().backward()

    shard = torch.chunk(full, tp, dim=-1)[rank].clone().requires_grad_(True)
    tok = token_logprobs(shard, labels)
    seq = sequence_logprobs(tok, mask, segments, n)
    (seq * weights).sum().backward()
    ref_grad = torch.chunk(ref_logits.grad, tp, dim=-1)[rank]
    return {
        "tp": tp, "shape": list(shape),
        "token_diff": float((tok - ref_tok).abs().max()),
        "seq_diff": float((seq - ref_seq).abs().max()),
        "grad_diff": float((shard.grad - ref_grad).abs().max()),
        "input_untouched": bool(torch.equal(shard.detach(), torch.chunk(full, tp, dim=-1)[rank])),
    }


def main():
    env = platform.init_distributed()
    results = []
    for tp in (t for t in (1, 2, 4) if env.world_size % t == 0):
        for shape in ((3, 10), (20,)):
            results.append(check(tp, shape))
    if env.rank == 0:
        json.dump(results, open(sys.argv[1], "w"))
    platform.shutdown()


if __name__ == "__main__":
    main()
