"""The ground floor: user-facing errors, the one handler every entry point uses, and the names of
a run directory. Imports nothing heavy (no torch, no yaml), so every module may import it.

A *user error* is a mistake the user can fix (a config value, a file, a lock held by another run,
a training that diverged): it ends with one `error: ...` line per problem and exit code 2, no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable, Optional

# -- exit codes ---------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug (traceback printed)
EXIT_USER_ERROR = 2  # one `error:` line per problem
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal with progress saved; requeue / rerun to resume
EXIT_TIMED_OUT = 124  # a local stage ran past its wall-clock limit
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM of an interactive command

# -- names inside run and checkpoint directories ------------------------------------------------
CHECKPOINT_META = "aipo_checkpoint.json"  # beside a Megatron checkpoint: format, family, HF config, layout
LATEST = "latest"  # RUN_DIR/.../checkpoints/latest -> the newest complete checkpoint
TRAIN_STATE = "train_state.json"  # the trainer's step, data position and metrics at a checkpoint
RUN_STATE = "run_state.json"  # `aipo-mp run`: completed stages and each round's policy
STOP_MARKER = b"stopped by signal"  # printed by a stage that saved and stopped on a signal


class UserError(Exception):
    """A mistake the user can fix. `errors` holds one line per problem (what, where, how to fix)."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else [str(e) for e in errors]
        super().__init__("\n".join(self.errors))


class ConfigError(UserError, ValueError):
    """A config value, a command-line argument or a layout that cannot work."""


class DataError(UserError, ValueError):
    """The user's data (pairs, prompts, samples, answers) or a data setting; names the file and line."""


class CheckpointError(UserError):
    """A checkpoint or model directory that cannot be read, or does not fit the run."""


class LockHeld(UserError):
    """Another live process holds the directory."""


class NonFiniteError(UserError):
    """Training produced NaN or inf; names the step and what to check."""


class StageFailed(UserError):
    """A stage of `aipo-mp run` failed; its own error line and where its logs are."""


DISK_ERRNOS = {
    "ENOSPC": "the disk is full", "EDQUOT": "the disk quota is exceeded", "EROFS": "the file system is read-only",
    "EACCES": "permission denied", "EPERM": "permission denied",
    "EFBIG": "the file is larger than allowed (file size limit)",
}


def disk_error_line(e: OSError) -> Optional[str]:
    """A write that failed for a reason outside the program (full disk, read-only or forbidden
    path): one line naming the path and the fix, not a traceback."""
    name = errno.errorcode.get(e.errno or 0, "")
    if name not in DISK_ERRNOS:
        return None
    where = e.filename or "the output directory"
    return (f"cannot write {where}: {DISK_ERRNOS[name]}; free space or choose a writable output directory "
            "(output.dir / --out), then rerun (completed steps are kept)")


def error_lines(exc: BaseException) -> Optional[list[str]]:
    """The `error:` lines of a user-facing failure, or None for a bug."""
    if isinstance(exc, UserError):
        return exc.errors or [type(exc).__name__]
    if isinstance(exc, FileExistsError):
        return [str(exc)]
    if isinstance(exc, OSError):
        line = disk_error_line(exc)
        return [line] if line else None
    return None


def print_errors(lines: list[str]) -> None:
    for line in lines:
        print(f"error: {line}", file=sys.stderr, flush=True)


def run_main(body: Callable[[], int]) -> int:
    """Run an entry point: a user error becomes its `error:` lines and exit 2, Ctrl-C exit 130;
    a bug propagates with its traceback. Returns the exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - user errors get lines; the rest re-raised below
        lines = error_lines(exc)
        if lines is None:
            raise
        print_errors(lines)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
