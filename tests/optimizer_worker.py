"""One rank of the optimizer checks. argv: spec.json out_dir.

spec.json: {"runs": [{"name", "overrides"}], "collectives": [overrides] or null}.
- runs: as tests/train_worker.py (several runs may share a name: the later one resumes the
  earlier one's checkpoint, possibly at another layout); params.pt after each run.
- collectives: trains 2 steps with a checkpoint each step, resumes for a third, and has rank 0
  fail inside `on_rank0_then_agree`, while every tensor collective that aipo_mp issues is checked
  to run on a tensor made on `platform.device()`. On CPU that device is the CPU, so the check
  makes it observable: `platform.device()` answers the meta device, and a TorchFunctionMode
  turns meta placements back into CPU tensors that it tags; a collective on an untagged tensor
  (made without platform.device(), as an NCCL run would reject) is recorded as a violation.
  Writes out_dir/collectives_rank{r}.json: {"calls": {"module.function": count}, "violations": [...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from aipo_mp.config import load_config
from aipo_mp.runtime import platform
from aipo_mp.training.loop import train
from tests.train_worker import gathered_params

TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                      "reduce", "reduce_scatter", "all_to_all_single", "gather", "scatter")
OUR_PACKAGES = ("aipo_mp", "checkpoint_tools")
META = torch.device("meta")


def _is_meta(dev) -> bool:
    return (isinstance(dev, torch.device) and dev.type == "meta") or dev == "meta"


class PlatformDeviceTagger(torch.overrides.TorchFunctionMode):
    """Tensors placed on platform.device() (here: meta) become tagged CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        hit = _is_meta(kwargs.get("device"))
        if hit:
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and any(_is_meta(a) for a in args[1:]):
            args = tuple("cpu" if _is_meta(a) else a for a in args)
            hit = True
        out = func(*args, **kwargs)
        if hit and isinstance(out, torch.Tensor):
            if args and out is args[0]:
                out = out.clone()  # a real device move makes a new tensor too
            out.on_platform_device = True
        return out


def install_collective_checks(calls: dict, violations: list) -> None:
    for name in TENSOR_COLLECTIVES:
        original = getattr(torch.distributed, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.split(".")[0] in OUR_PACKAGES:
                where = f"{module}.{caller.f_code.co_name}"
                calls[where] = calls.get(where, 0) + 1
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                for t in tensors:
                    if not getattr(t, "on_platform_device", False):
                        violations.append(f"{where}: torch.distributed.{_name} on a tensor not made on platform.device()")
            return _original(*args, **kwargs)

        setattr(torch.distributed, name, checked)


def run_collectives(overrides: list[str], out: Path, rank: int) -> None:
    from aipo_mp.training.checkpoint import on_rank0_then_agree

    calls, violations = {}, []
    install_collective_checks(calls, violations)
    platform.device = lambda: META
    run_dir = out / "collectives"
    with PlatformDeviceTagger():
        train(load_config(None, overrides + [f"output.dir={run_dir}", "train.steps=2", "train.save_every=1"]))
        train(load_config(None, overrides + [f"output.dir={run_dir}", "train.steps=3", "train.save_every=1"]))

        def fail_on_rank0():
            raise OSError("disk gone")

        try:
            on_rank0_then_agree(fail_on_rank0)
            raised = None
        except (OSError, RuntimeError) as e:
            raised = type(e).__name__
    (out / f"collectives_rank{rank}.json").write_text(json.dumps(
        {"calls": calls, "violations": sorted(set(violations)), "agree_raised": raised}))


def main():
    spec = json.load(open(sys.argv[1]))
    out = Path(sys.argv[2])
    env = platform.init_distributed()
    for run in spec.get("runs", []):
        cfg = load_config(None, run["overrides"] + [f"output.dir={out / run['name']}"])
        state = train(cfg)
        params = gathered_params(state)
        if env.rank == 0:
            torch.save(params, out / run["name"] / "params.pt")
        torch.distributed.barrier()
    if spec.get("collectives"):
        run_collectives(spec["collectives"], out, env.rank)
    platform.shutdown()


if __name__ == "__main__":
    main()
