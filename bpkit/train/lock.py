"""One writer per run directory: an exclusive ``fcntl.flock`` on ``<run dir>/train.lock``.

The kernel releases the lock when its process dies (``kill -9`` included), so a stale lock
cannot block a restart. A second ``bpkit train`` on the same directory exits with status 2
naming the PID that holds it (read from ``/proc/locks`` where there is one, else from the PID
the holder wrote into the file). ``bpkit eval`` and ``bpkit plot`` only read and take no lock.
Taking the lock writes nothing; ``write_pid`` does, once the run has been accepted.
"""
from __future__ import annotations

import fcntl
import os

from bpkit.train.writers import RunDirError, os_failure

LOCK_NAME = "train.lock"


def _holder_from_proc_locks(path: str) -> int | None:
    """The PID holding a flock on ``path``'s inode, per Linux's ``/proc/locks``."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":  # "1: -> FLOCK ..." lines are waiters
            continue
        try:
            major, minor, inode = parts[5].split(":")  # hex major, hex minor, decimal inode
            major, minor, inode, pid = int(major, 16), int(minor, 16), int(inode), int(parts[4])
        except ValueError:
            continue
        if (inode, major, minor) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
            return pid
    return None


def _holder_from_file(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class RunLock:
    """``acquire()`` or ``RunDirError``; ``release()`` (also on garbage collection/exit)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_failure("lock the run directory by creating", self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _holder_from_proc_locks(self.path) or _holder_from_file(self.path)
            who = f"another bpkit process (PID {pid})" if pid else "another bpkit process"
            raise RunDirError(
                f"{self.run_dir} is in use by {who}, which holds {self.path}; wait for it to "
                "finish or stop it, or train into another run.out_dir") from None
        self.fd = fd
        return self

    def write_pid(self) -> None:
        """Record this process's PID in the lock file (for humans; the lock is the flock)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            raise os_failure("write", self.path, e) from None

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
