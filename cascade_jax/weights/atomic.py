"""Writing outputs so that a failure, Ctrl-C, SIGTERM or kill -9 never leaves a half-written one.

Everything is written into a hidden sibling named ``.NAME.tmp-HOST-PID`` and renamed into place.
SIGTERM is turned into an exception while writing, so the cleanup runs as it does for Ctrl-C; a
process killed with -9 cannot clean up, so the next write into the same folder removes the temp
entries of processes of this host that no longer exist. The host is in the name because on a
shared filesystem another machine's PID says nothing about this one's processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[^/]+)-(?P<pid>\d+)$")


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived while an output was being written."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """The hidden sibling this process writes ``target`` into (``kind``: tmp, or old for a replaced one)."""
    return target.with_name(f".{target.name}.{kind}-{_host()}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temp entries in ``folder`` (for ``name`` only, if given) left by dead processes of this host."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or (name is not None and match["name"] != name) or match["host"] != _host():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not _alive(pid):
            remove(entry)
            removed.append(entry)
    return removed


def remove(path: Path, settle_s: float = 0.3, timeout_s: float = 30.0):
    """Delete a file or folder and keep deleting until it stays gone: writer threads of an interrupted
    save (Orbax/TensorStore) may still create files in it for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not os.path.lexists(path):
            time.sleep(settle_s)
            if not os.path.lexists(path) or time.monotonic() > deadline:
                return
        elif time.monotonic() > deadline:
            return


@contextlib.contextmanager
def sigterm_as_exception():
    """Within the block, SIGTERM raises :class:`Interrupted` (a KeyboardInterrupt) in the main thread,
    so ``finally`` clauses clean up as on Ctrl-C. Outside the main thread signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread() or \
            getattr(signal.getsignal(signal.SIGTERM), "graceful", False):
        # A graceful handler (the trainer's, training/interrupt.py) lets the write finish, or raises as this would.
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"signal {signum} while writing; the partial output was removed")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_text(path: Path, text: str):
    """Write ``text`` to ``path`` through its temp sibling: the old file or the new one, never part of one."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with sigterm_as_exception():
            tmp.write_text(text)
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            remove(tmp)
