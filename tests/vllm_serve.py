"""`python tests/vllm_serve.py serve MODEL ...`: vLLM's own `vllm serve` entry point for the CPU wheel,
through the package's launcher (aipo_mp/runtime/vllm_cli.py; docs/eval.md). On GPU machines run
`vllm serve` itself."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aipo_mp.runtime.vllm_cli import main  # noqa: E402  (answers vLLM's version lookup at import)

if __name__ == "__main__":
    sys.exit(main())
