"""One rank of several checkpoint_tools commands run back to back in one launch (saves the
~10 s of imports per launch a CLI call costs). argv: a JSON list of argument lists."""

from __future__ import annotations

import json
import os
import sys

from aipo_mp.convert.cli import main
from tests.launch import PORTS_ENV


def run() -> int:
    commands = json.loads(sys.argv[1])
    # Each command starts and ends its own process group, each on a fresh rendezvous port
    # (re-initializing on the port of a destroyed group hangs). The launcher picked ports that
    # were free: MASTER_PORT + k could be in use by anything on the machine.
    ports = os.environ[PORTS_ENV].split(",")
    assert len(ports) >= len(commands), f"{len(commands)} commands need as many ports; {PORTS_ENV} has {len(ports)}"
    for k, argv in enumerate(commands):
        os.environ["MASTER_PORT"] = ports[k]
        rc = main(argv)
        if rc:
            print(f"checkpoint_tools {' '.join(argv)} exited with {rc}", flush=True)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run())
