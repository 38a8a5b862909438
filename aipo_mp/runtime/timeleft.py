"""Time left in the Slurm job: the trainer saves and stops while it still can.

The slurm launcher puts the job's end time (from `squeue -o %e`) into every step's environment as
AIPO_JOB_END (seconds since the epoch). `TimeGuard.out_of_time(step_s, save_s)` is true once the
next step plus a save (each counted twice, plus a margin) would not finish before that time: the
trainer then stops as on a signal (save, exit 75, requeue). This backs up the `--signal=B:USR1@T`
warning, which comes too late when T is shorter than a step plus a save.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from typing import Optional

MARGIN_S = 60.0


def slurm_job_end(job_id: str, environ: Optional[dict] = None) -> Optional[float]:
    """The job's EndTime as epoch seconds, or None (no limit, or squeue unavailable)."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=30,
                           env=dict(os.environ if environ is None else environ))
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = r.stdout.strip()
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()  # Slurm prints local time
    except ValueError:
        return None  # "N/A", "Unknown", "NONE": no end time


class TimeGuard:
    def __init__(self, environ: Optional[dict] = None, margin_s: float = MARGIN_S):
        env = os.environ if environ is None else environ
        try:
            self.end: Optional[float] = float(env["AIPO_JOB_END"])
        except (KeyError, ValueError):
            self.end = None
        self.margin_s = margin_s

    def out_of_time(self, step_s: float, save_s: float, now: Optional[float] = None) -> bool:
        if self.end is None:
            return False
        now = time.time() if now is None else now
        return now + 2 * step_s + 2 * save_s + self.margin_s > self.end
