"""Child processes that die with their parent.

A worker started in its own session (so a terminal's Ctrl-C reaches only the parent, which then
stops the workers in order) would otherwise outlive a parent killed with SIGKILL, finish and
publish its output. `die_with_parent` (a Popen preexec_fn, Linux) asks the kernel to send the
child SIGTERM when its parent dies; the child then cleans up as on any SIGTERM."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn for subprocess.Popen."""
    parent = os.getpid()  # evaluated in the parent, before the fork

    def preexec() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
        except (OSError, AttributeError):  # not Linux: no parent-death signal
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec

