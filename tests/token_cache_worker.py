"""One rank of the token-cache checks (tests/dist/test_token_cache.py). argv: spec.json out_dir.

spec.json: {"config": path, "model": dir, "scenarios": [{"name", "data", "out", "local_rank"}]}.
`local_rank` is what LOCAL_RANK says for this rank ("rank": one node; 0: one rank per node).
`out` may hold {rank}: a per-rank (node-local) output directory. Each scenario writes
out_dir/NAME.rankR.json: the pairs' tokens, the data fingerprint, how often this rank tokenized,
or the error lines it raised."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from aipo_mp.config import load_config
from aipo_mp.errors import UserError
from aipo_mp.runtime import platform
from aipo_mp.training import state as train_state


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    platform.init_distributed()
    rank = torch.distributed.get_rank()
    calls = []
    real = train_state.tokenize
    train_state.tokenize = lambda *a: calls.append(1) or real(*a)  # count who tokenizes
    for sc in spec["scenarios"]:
        os.environ["LOCAL_RANK"] = str(rank if sc["local_rank"] == "rank" else sc["local_rank"])
        cfg = load_config(spec["config"], [f"model.path={spec['model']}", f"data.train={sc['data']}",
                                           f"output.dir={sc['out'].format(rank=rank)}", "train.seq_length=128"])
        calls.clear()
        result = {}
        try:
            pairs, stats, fingerprint = train_state.prepare_data(cfg, spec["model"], 512)
            result = {"pairs": [[p.index, p.prompt, p.chosen, p.rejected] for p in pairs], "kept": stats.kept,
                      "fingerprint": fingerprint}
        except UserError as e:
            result = {"error": e.errors}
        result["tokenized"] = len(calls)
        (out / f"{sc['name']}.rank{rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
