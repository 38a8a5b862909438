"""Times the local backend's core attention (`aipo_mp.models.layers.TorchCoreAttention`) inside
the trainer's own rank processes, for `benchmarks/train_step.py`; nothing in the training path
changes and nothing runs unless a benchmark asks for it.

`train_step.py` puts a generated `sitecustomize.py` that calls `install(DIR)` first on the ranks'
PYTHONPATH (with AIPO_BENCH_ATTENTION_DIR=DIR). `install` adds an import hook that, once
`aipo_mp.models.layers` is imported, wraps `TorchCoreAttention.forward`:
  - forward: the wall time of the call;
  - backward: two identity autograd functions, one on the output (its backward starts the clock)
    and one on query/key/value (its backward, which runs once their gradients are complete,
    stops it). The autograd engine runs a layer's attention backward nodes between the two
    (they were created between them), one layer at a time, so the interval is that layer's
    core-attention backward;
  - modules in eval mode (the reference pass) are timed apart, as `reference_fwd_s`.
After each optimizer step (torch's global step hook) each rank appends one JSON line to
DIR/attention_rank{RANK}.jsonl: {"fwd_s", "bwd_s", "calls", "reference_fwd_s"} of that step.
On CUDA tensors the clock synchronizes the device at each boundary (which costs some overlap).

With AIPO_BENCH_PROFILE_STEP=N as well, torch.profiler records training step N (from the end of
step N-1's optimizer step to the end of step N's) and each rank writes the operators' self time
to DIR/profile_rank{RANK}.txt: the profile that explains a step time.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

TARGET = "aipo_mp.models.layers"
_rec = {"fwd_s": 0.0, "bwd_s": 0.0, "calls": 0, "reference_fwd_s": 0.0}
_bwd_start: list[float] = []


def install(out_dir: str) -> None:
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET], out_dir)
    else:
        sys.meta_path.insert(0, _AfterImport(out_dir))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Lets the normal finder load the target module, then patches it."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module, self.out_dir)

        spec.loader.exec_module = exec_module
        return spec


def _sync(t) -> None:
    if t is not None and t.is_cuda:
        import torch

        torch.cuda.synchronize(t.device)


def _patch(module, out_dir: str) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    cls = getattr(module, "TorchCoreAttention", None)
    if cls is None or getattr(cls, "_aipo_probe", False):
        return
    original = cls.forward

    class StopClock(torch.autograd.Function):  # on query/key/value: backward runs after the attention's
        @staticmethod
        def forward(ctx, q, k, v):
            return q.view_as(q), k.view_as(k), v.view_as(v)

        @staticmethod
        def backward(ctx, gq, gk, gv):
            _sync(gq)
            if _bwd_start:
                _rec["bwd_s"] += time.perf_counter() - _bwd_start.pop()
            return gq, gk, gv

    class StartClock(torch.autograd.Function):  # on the output: backward runs before the attention's
        @staticmethod
        def forward(ctx, out):
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            _sync(grad)
            _bwd_start.append(time.perf_counter())
            return grad

    def forward(self, query, key, value, *args, **kwargs):
        if not self.training:  # the reference pass
            t0 = time.perf_counter()
            out = original(self, query, key, value, *args, **kwargs)
            _sync(out)
            _rec["reference_fwd_s"] += time.perf_counter() - t0
            return out
        track = torch.is_grad_enabled() and query.requires_grad
        if track:
            query, key, value = StopClock.apply(query, key, value)
        _sync(query)
        t0 = time.perf_counter()
        out = original(self, query, key, value, *args, **kwargs)
        _sync(out)
        _rec["fwd_s"] += time.perf_counter() - t0
        _rec["calls"] += 1
        return StartClock.apply(out) if track else out

    cls.forward = forward
    cls._aipo_probe = True
    path = os.path.join(out_dir, f"attention_rank{os.environ.get('RANK', '0')}.jsonl")

    profile_step = int(os.environ.get("AIPO_BENCH_PROFILE_STEP", "0") or 0)
    state = {"step": 0, "profiler": None}

    def after_step(optimizer, args, kwargs):
        if not (_rec["fwd_s"] or _rec["bwd_s"]):  # a second optimizer of the same step (experts)
            return
        with open(path, "a") as f:
            f.write(json.dumps(_rec) + "\n")
        _rec.update(fwd_s=0.0, bwd_s=0.0, calls=0)
        state["step"] += 1
        if state["profiler"] is not None:
            _write_profile(state.pop("profiler"), out_dir)
            state["profiler"] = None
        elif profile_step and state["step"] == profile_step - 1:
            state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["profiler"].__enter__()

    register_optimizer_step_post_hook(after_step)


def _write_profile(prof, out_dir: str) -> None:
    prof.__exit__(None, None, None)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    with open(os.path.join(out_dir, f"profile_rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
        f.write(table)


SITECUSTOMIZE = '''import os
import sys

if os.environ.get("AIPO_BENCH_ATTENTION_DIR"):
    sys.path.insert(0, {bench_dir!r})
    import attention_probe

    attention_probe.install(os.environ["AIPO_BENCH_ATTENTION_DIR"])
    sys.path.remove({bench_dir!r})
'''


def write_sitecustomize(directory) -> str:
    """A sitecustomize.py in `directory` (put it first on PYTHONPATH) that installs the probe in
    every process started with AIPO_BENCH_ATTENTION_DIR set; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    text = SITECUSTOMIZE.format(bench_dir=os.path.dirname(os.path.abspath(__file__)))
    tmp = os.path.join(directory, "sitecustomize.py.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(directory, "sitecustomize.py"))
    return str(directory)


def read(out_dir: str) -> dict[int, list[dict]]:
    """{rank: [per-step records]} written by the ranks."""
    result = {}
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if name.startswith("attention_rank") and name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name)) as f:
                result[int(name[len("attention_rank"):-len(".jsonl")])] = [json.loads(l) for l in f if l.strip()]
    return result
