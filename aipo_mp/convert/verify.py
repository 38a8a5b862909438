"""verify: a Megatron checkpoint's logits against transformers' on the HF directory it came from."""

from __future__ import annotations

from pathlib import Path

from aipo_mp.config import ModelArch
from aipo_mp.convert.common import build_for_conversion, check_layout, rank_stats, setup_parallel


def verify_rank(args) -> dict:
    import torch

    from aipo_mp.models import arch_from_hf_config, family_for_hf_config
    from aipo_mp.runtime import platform
    from aipo_mp.training.checkpoint import load_model, read_meta
    from aipo_mp.training.forward import forward_only
    from aipo_mp.training.logprobs import gather_vocab_parallel

    meta = read_meta(args.ckpt)
    family, arch = family_for_hf_config(meta["hf_config"]), arch_from_hf_config(meta["hf_config"])
    tp, pp, vpp, ep, etp = verify_layout(args, meta, arch)
    check_layout(arch, tp, pp, vpp, ep, etp)
    ref = torch.load(args.reference, weights_only=True)
    setup_parallel(tp, pp, vpp, ep, etp)
    built = build_for_conversion(family, arch, tp, pp, vpp, "fp32", ep, etp)
    load_model(built, args.ckpt)
    batch = ref["batch"]
    worst = torch.zeros((), dtype=torch.float64)

    def collect(logits, b):
        nonlocal worst
        full = gather_vocab_parallel(logits)[0].double()
        for start, want in zip(b["starts"], b["want"]):
            got = full[start:start + want.shape[0]]
            worst = torch.maximum(worst, (got - want.to(got.device).double()).abs().max().cpu())

    batches = [batch] * (pp if vpp > 1 else 1)  # the interleaved schedule needs >= pp micro-batches
    forward_only(built.chunks, batches, collect, seq_length=batch["tokens"].shape[1], hidden_size=arch.hidden_size)
    worst = worst.to(platform.device())  # NCCL reduces device tensors only
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return rank_stats(max_abs_diff=float(worst), layout=dict(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp), family=family.name,
                       num_sequences=len(batch["starts"]))


def verify_layout(args, meta: dict, arch: ModelArch) -> tuple[int, int, int, int, int]:
    """(tp, pp, vpp, ep, etp): the stored layout when none of --tp/--pp/--vpp/--ep/--etp is given;
    otherwise the given one (1 where unset; --etp: --tp when --ep is 1)."""
    given = [getattr(args, k, None) for k in ("tp", "pp", "vpp", "ep", "etp")]
    if all(v is None for v in given):
        lay = meta["layout"]
        return (int(lay["tp"]), int(lay["pp"]), int(lay.get("vpp", 1)), int(lay.get("ep", 1)),
                int(lay.get("etp", 1)))
    from aipo_mp.convert.common import expert_tp

    tp, pp, vpp, ep, etp = given
    tp, ep = tp or 1, ep or 1
    return tp, pp or 1, vpp or 1, ep, expert_tp(arch, tp, ep, etp)


def make_reference(hf_dir: str | Path, out_path: str | Path, arch: ModelArch, seed: int = 0) -> None:
    """A packed row of three random sequences of different lengths (plus padding) and
    transformers' fp32 logits of each sequence run alone."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    limit = max(4, min(arch.max_position_embeddings, 4096))
    lengths = [min(n, limit) for n in (24, 13, 7)]
    row = sum(lengths) + 4
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager",
                                                 trust_remote_code=False).eval()
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, arch.vocab_size, (n,), generator=g) for n in lengths]
    tokens = torch.zeros(1, row, dtype=torch.long)
    starts, pos = [], 0
    for s in seqs:
        tokens[0, pos:pos + len(s)] = s
        starts.append(pos)
        pos += len(s)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), row], dtype=torch.int32)
    with torch.no_grad():
        want = [model(s[None]).logits[0].float() for s in seqs]
    batch = dict(tokens=tokens, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()), starts=starts, want=want)
    torch.save({"batch": batch}, str(out_path))

