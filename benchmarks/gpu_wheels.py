"""Download the wheels `benchmarks/gpu_check.sh` installs on a GPU machine that has CUDA torch but
no network and none of megatron-core, transformers, TE or vLLM (`make gpu-wheels` runs this).

The list is the dependency closure, as installed in this project's environment, of what the
trainer imports (megatron-core, transformers, sentencepiece, psutil, pyyaml, tqdm, safetensors),
without torch and what CUDA torch brings itself (numpy stays too: the GPU machine's torch has it).
Each is pinned to the version that works here and fetched with `pip download --no-deps` for the
target Python (default 3.12) and manylinux x86_64, into a git-ignored folder (default
gpu_wheels/) that travels with the working tree.

    python benchmarks/gpu_wheels.py [--python-version 3.12] [--dest gpu_wheels]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("megatron-core", "transformers", "sentencepiece", "psutil", "pyyaml", "tqdm", "safetensors")
# Provided by the GPU machine's CUDA torch install (or not needed there).
SKIP = {"torch", "numpy", "triton", "setuptools", "pip", "wheel", "sympy", "networkx", "jinja2", "markupsafe",
        "mpmath"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots=ROOTS) -> dict[str, str]:
    """{distribution: installed version} of `roots` and their (non-extra) requirements."""
    seen: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in SKIP or name.startswith("nvidia-"):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform-specific requirement not installed here
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(canonical(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return dict(sorted(seen.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--dest", default=str(ROOT / "gpu_wheels"))
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={v}" for n, v in closure().items()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           args.python_version, "--implementation", "cp", "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "any",
           "-d", str(dest), *pins]
    print(" ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code:
        print("error: pip download failed (see above); a pinned version may have no wheel for "
              f"Python {args.python_version}", file=sys.stderr)
        return 2
    (dest / "requirements.txt").write_text("".join(p + "\n" for p in pins))
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(pins)} wheels, {size / 2**20:.1f} MiB in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
