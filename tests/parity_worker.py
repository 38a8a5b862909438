"""One rank of the Megatron-vs-HF logits parity check. argv: spec.json results.json.

spec.json: {"cases": [{"family", "hf_dir", "tp", "pp", "vpp", "sp", "ep", "etp"}], "reference": path of a
torch file {family: {"rows": [[tokens...]...], "seqs": [[...]...], "logits": [tensor...]}}}.
Each case packs several sequences of different lengths into one row (plus padding); the logits
of each sequence must equal HF's logits of that sequence alone."""

from __future__ import annotations

import json
import sys

import torch

from aipo_mp.config import MoEConfig, ParallelConfig, PrecisionConfig
from aipo_mp.convert.hf_io import HFWeights
from aipo_mp.models import arch_from_dir, get_family
from aipo_mp.models.build import build_model, load_hf_weights
from aipo_mp.runtime import platform
from aipo_mp.training.forward import forward_only
from aipo_mp.training.logprobs import gather_vocab_parallel


def run_case(case: dict, ref: dict) -> float:
    par = ParallelConfig(tp=case["tp"], pp=case["pp"], vpp=case.get("vpp", 1), sequence_parallel=case.get("sp", False),
                         ep=case.get("ep", 1), etp=case.get("etp", 1))
    platform.initialize_model_parallel(par.tp, par.pp, par.vpp, ep=par.ep, etp=par.etp)
    platform.seed_model_parallel_rng(0)
    arch = arch_from_dir(case["hf_dir"])
    moe = MoEConfig(dispatcher=case.get("dispatcher", "alltoall"))
    built = build_model(get_family(arch.family), arch, par, PrecisionConfig(backend="local"), moe=moe)
    for chunk in built.chunks:
        chunk.eval()
    load_hf_weights(built, HFWeights(case["hf_dir"]).get)
    batch = ref["batch"]
    worst = torch.zeros(())

    def collect(logits, b):
        nonlocal worst
        full = gather_vocab_parallel(logits)[0]  # [T, V]
        for start, want in zip(b["starts"], b["want"]):
            got = full[start:start + want.shape[0]]
            worst = torch.maximum(worst, (got - want).abs().max())

    # The interleaved schedule needs at least pp micro-batches.
    batches = [batch] * (par.pp if par.vpp > 1 else 1)
    forward_only(built.chunks, batches, collect, seq_length=batch["tokens"].shape[1], hidden_size=arch.hidden_size)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return float(worst)


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    env = platform.init_distributed()
    torch.set_num_threads(1)
    results = []
    for case in spec["cases"]:
        ref = torch.load(spec["reference"][case["family"]], weights_only=True)
        results.append(dict(case, max_abs_diff=run_case(case, ref)))
    if env.rank == 0:
        json.dump(results, open(sys.argv[2], "w"), indent=1)
    platform.shutdown()


if __name__ == "__main__":
    main()
