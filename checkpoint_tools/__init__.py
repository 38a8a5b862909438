"""Conversions between Hugging Face safetensors directories and aipo_mp Megatron checkpoints
(`aipo_mp.checkpoint`), at any TP/PP/VPP layout, plus verification and inspection.

The command line is in `__main__.py` (`python -m checkpoint_tools --help`). The pieces it runs:

- `common`: sizes, memory sampling, and the checks that need no process group (every user
  mistake becomes a one-line `ConfigError` before any process starts or any byte is written);
- `hf_to_mcore`, `mcore_to_hf`, `verify`: the per-rank programs, run on every rank of a
  gloo/NCCL process group;
- `tensor_io`: the shared weight I/O (safetensors reading and writing, the finished HF directory);
- `inspection`: `inspect`.

Importing this package imports no torch: usage errors answer at once.
"""

from __future__ import annotations

from checkpoint_tools.common import (  # noqa: F401 - the package's API
    BYTES_PER, INDEX, SUPPORTED_DTYPES, AnonMemorySampler, ConfigError, HFSource, check_destination,
    check_free_space, check_layout, check_weight_files, choose_dtype, hf_config_and_arch, hf_source, human_bytes,
    human_count, is_enospc, parse_size, peak_rss_bytes,
)
from checkpoint_tools.inspection import format_inspect, inspect_dir  # noqa: F401
from checkpoint_tools.verify import make_reference, verify_layout  # noqa: F401


def rank_program(command: str):
    """The per-rank program of a multi-rank command (imported on use: it pulls in torch)."""
    if command == "hf-to-mcore":
        from checkpoint_tools.hf_to_mcore import hf_to_mcore_rank as program
    elif command == "mcore-to-hf":
        from checkpoint_tools.mcore_to_hf import mcore_to_hf_rank as program
    elif command == "verify":
        from checkpoint_tools.verify import verify_rank as program
    else:
        raise KeyError(command)
    return program
