"""Exclusive locks on output directories, so two commands never write one directory at once.

`DirectoryLock(directory, what)` takes an advisory `flock` on DIRECTORY/.aipo.lock (created with
the user's umask) and writes who holds it (command, host, pid, Slurm job, start time) into that
file. A second holder fails at once with one line naming the first. The kernel releases the lock
when the holder exits, however it exits (a crash or SIGKILL leaves no stale lock); the file stays
and is reused. flock works across nodes on shared file systems that support it (NFSv4, Lustre
with -o flock, GPFS); where it does not, the lock only protects against a second command on the
same node.

    with DirectoryLock(run_dir, "aipo-mp run"):
        ...
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from aipo_mp.config import ConfigError

LOCK_NAME = ".aipo.lock"


class DirectoryLocked(ConfigError):
    """The directory is in use by another command."""


def holder_description(info: dict) -> str:
    parts = [f"pid {info.get('pid')} on {info.get('host')}"]
    if info.get("slurm_job"):
        parts.append(f"Slurm job {info['slurm_job']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return f"{info.get('what', 'another command')} ({', '.join(parts)})"


class DirectoryLock:
    def __init__(self, directory: str | Path, what: str):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise DirectoryLocked(f"{self.directory} is in use by {holder_description(holder)}; wait for it to "
                                  f"finish or stop it (scancel), or choose another output.dir") from None
        info = {"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _read_holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
