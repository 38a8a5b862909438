"""One command at a time per output directory (train, run, conversions).

    with hold_lock(out_dir, "train"):
        ...

The lock is a sibling file `.NAME.lock` holding the owner's pid, host and command, locked with
flock: the kernel releases it when the process dies however it dies, so a lock left by a killed
process is stale by construction and simply taken over (its file is removed on a clean exit). A second command on the same directory
fails at once with one line naming the holder. Child processes started by the holder (the ranks
of `train --nproc-per-node`) inherit the right to write through AIPO_MP_LOCKED_DIRS.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from aipo_mp.errors import LockHeld

HELD_ENV = "AIPO_MP_LOCKED_DIRS"


def lock_path(directory: str | Path) -> Path:
    d = Path(directory).resolve()
    return d.parent / f".{d.name}.lock"


def held_by_parent(directory: str | Path) -> bool:
    return str(Path(directory).resolve()) in os.environ.get(HELD_ENV, "").split(os.pathsep)


class Lock:
    def __init__(self, directory: str | Path, what: str):
        self.directory = Path(directory).resolve()
        self.path = lock_path(directory)
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "Lock":
        if held_by_parent(self.directory):
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd)
                os.close(fd)
                raise LockHeld(f"{self.directory} is in use by {holder_description(holder)}; wait for it to "
                               "finish, stop it (scancel), or choose another output directory") from None
            if same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        os.ftruncate(fd, 0)  # a stale holder's record (its process died and the kernel freed the lock)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                 "slurm_job": os.environ.get("SLURM_JOB_ID"),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        os.environ[HELD_ENV] = os.pathsep.join(filter(None, [os.environ.get(HELD_ENV), str(self.directory)]))
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        held = [d for d in os.environ.get(HELD_ENV, "").split(os.pathsep) if d and d != str(self.directory)]
        os.environ[HELD_ENV] = os.pathsep.join(held)
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiter that opened it re-checks the inode
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def holder_description(info: dict) -> str:
    """`what` (pid P on HOST, Slurm job J, since T): who holds a lock, from its record."""
    parts = [f"pid {info.get('pid', '?')} on {info.get('host', '?')}"]
    if info.get("slurm_job"):
        parts.append(f"Slurm job {info['slurm_job']}")
    parts.append(f"since {info.get('since', '?')}")
    return f"`{info.get('what', 'another command')}` ({', '.join(parts)})"


def read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold_lock(directory: str | Path, what: str):
    """Hold the lock of `directory` for the block; LockHeld (one line) if a live process has it."""
    lock = Lock(directory, what).acquire()
    try:
        yield lock
    finally:
        lock.release()
