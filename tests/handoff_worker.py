"""One rank of the trainer-handoff check: build a model at a layout, load an HF directory's
weights, and write the handoff (aipo_mp.convert.handoff.write_policy_hf) as the trainer does at
the end of a round. argv: spec.json.

spec.json: {"cases": [{"hf_dir", "out", "tp", "pp", "vpp", "sp", "ep", "etp", "extra", "dtype"}]}; the
test compares each `out` with its `hf_dir`. `extra`: where the tokenizer files come from
(default: hf_dir). Each rank also lists the part files it wrote in `out`.writers.rank<R>.json
(the real writer, wrapped to record its calls), so the test can see that no replica wrote a part
a second time (two replicas writing the same part name would go unnoticed in the result)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from aipo_mp.config import MoEConfig, ParallelConfig, PrecisionConfig
from aipo_mp.convert import tensor_io
from aipo_mp.convert.handoff import write_policy_hf
from aipo_mp.convert.hf_io import HFWeights
from aipo_mp.models import arch_from_dir, get_family, read_hf_config
from aipo_mp.models.build import build_model, load_hf_weights
from aipo_mp.runtime import platform


def run_case(case: dict) -> None:
    par = ParallelConfig(tp=case.get("tp", 1), pp=case.get("pp", 1), vpp=case.get("vpp", 1),
                         sequence_parallel=case.get("sp", False), ep=case.get("ep", 1), etp=case.get("etp", 1))
    platform.initialize_model_parallel(par.tp, par.pp, par.vpp, ep=par.ep, etp=par.etp)
    platform.seed_model_parallel_rng(0)
    arch = arch_from_dir(case["hf_dir"])
    built = build_model(get_family(arch.family), arch, par, PrecisionConfig(backend="local"), initialize=False,
                        moe=MoEConfig())
    load_hf_weights(built, HFWeights(case["hf_dir"]).get)
    written = []
    real = tensor_io.write_part_files

    def recording(directory, part, files, *args, **kwargs):
        written.append(part)
        return real(directory, part, files, *args, **kwargs)

    tensor_io.write_part_files = recording
    try:
        write_policy_hf(built, case["out"], read_hf_config(case["hf_dir"]), case.get("extra") or case["hf_dir"],
                        case.get("dtype", "fp32"))
    finally:
        tensor_io.write_part_files = real
    rank = torch.distributed.get_rank()
    Path(f"{case['out']}.writers.rank{rank}.json").write_text(json.dumps(written))


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    platform.init_distributed()
    torch.set_num_threads(1)
    for case in spec["cases"]:
        run_case(case)
    platform.shutdown()


if __name__ == "__main__":
    main()
