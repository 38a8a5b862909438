"""One rank of several checkpoint_tools commands run back to back in one launch (saves the
~10 s of imports per launch a CLI call costs). argv: a JSON list of argument lists."""

from __future__ import annotations

import json
import os
import sys

from aipo_mp.convert.cli import main


def run() -> int:
    base_port = int(os.environ["MASTER_PORT"])
    for k, argv in enumerate(json.loads(sys.argv[1])):
        # Each command starts and ends its own process group; a fresh rendezvous port per command
        # (re-initializing on the port of a destroyed group hangs).
        os.environ["MASTER_PORT"] = str(base_port + 1 + k)
        rc = main(argv)
        if rc:
            print(f"checkpoint_tools {' '.join(argv)} exited with {rc}", flush=True)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run())
