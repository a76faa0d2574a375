"""One trainer per run folder: an exclusive ``flock`` on ``checkpoint_path/experiment_id/.lock``.

Two trainers writing one run interleave their Orbax checkpoints (one of them crashed with "No
ArrayMetadata" and left a temporary folder behind). The lock is the kernel's: it is released
when its process ends however it ends (kill -9 included), so a stale lock file never blocks a
later run. The file holds the holder's pid, host and start time, which the refusal quotes.
Only process 0 of a multi-host run takes it (the others write through the same checkpointer);
object-storage paths (``gs://``, ``s3://``) have no flock and are not locked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process is training the same run."""


class RunLock:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's line stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunLockedError(f"{self.folder} is in use by {holder}: two trainers would overwrite each other's "
                                 "checkpoints. Wait for it to finish (or stop it), or give this run another "
                                 "experiment_id or checkpoint_path") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(folder) -> RunLock:
    """The lock of ``folder`` (not yet taken); a no-op lock on hosts other than 0 and for URLs."""
    import jax  # here: the lock itself needs only the standard library (a test holds it from a bare process)

    if jax.process_index() != 0 or "://" in str(folder):
        return _NoLock(folder)
    return RunLock(folder)


class _NoLock(RunLock):
    def acquire(self) -> "RunLock":
        return self
