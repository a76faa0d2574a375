"""Writing outputs so that a failure, Ctrl-C, SIGTERM or kill -9 never leaves a half-written one: the one
helper every local writer of the library uses (:func:`replacing`, :func:`write_bytes`, :func:`write_text`).

It lives in the lowest layer (storage imports nothing else of cascade_jax) so that data, weights, pipelines
and training can all use it. Everything is written into a hidden sibling named ``.NAME.tmp-HOST-PID`` (with
``-tTHREAD`` from a thread other than the main one) and renamed into place; a folder or file already there
is renamed aside first and removed after, so the target is the old one or the new one, never a mix.
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

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[^/]+)-(?P<pid>\d+)(?:-t\d+)?$")


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived while an output was being written."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """The hidden sibling this process writes ``target`` into (``kind``: tmp, or old for a replaced one)."""
    # Threads of one process writing the same target (shard indexes) each need their own temp name.
    thread = "" if threading.current_thread() is threading.main_thread() else f"-t{threading.get_ident()}"
    return target.with_name(f".{target.name}.{kind}-{_host()}-{os.getpid()}{thread}")


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


@contextlib.contextmanager
def replacing(target, *, fsync: bool = False):
    """Yield the temp sibling to write ``target`` into (a file, or a folder the caller creates); when the
    block ends normally it takes ``target``'s place (:func:`publish`), else it is removed. Temp entries of
    dead processes of this host for the same name go first. SIGTERM inside the block cleans up as Ctrl-C.
    ``fsync``: the written file (or every file of the folder) reaches the disk before the rename, so a
    power loss leaves the old output or the new one (for weights; not worth it for logs and previews)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    tmp = temp_path(target)
    try:
        with sigterm_as_exception():
            yield tmp
            if not os.path.lexists(tmp):
                raise FileNotFoundError(f"nothing was written to {tmp} for {target}")
            if fsync:
                _fsync_tree(tmp)
            publish(tmp, target)
            if fsync:
                _fsync_path(target.parent)  # the rename itself
    finally:
        if os.path.lexists(tmp):
            remove(tmp)


def write_bytes(path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through its temp sibling: the old file or the new one, never part of one."""
    with replacing(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str, *, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode(), fsync=fsync)


def publish(tmp: Path, target: Path):
    """Put the finished ``tmp`` (a sibling of ``target``) in ``target``'s place. A file replaces a file in one
    rename; an old folder (or a file where a folder goes) is renamed aside first and removed after."""
    tmp, target = Path(tmp), Path(target)
    if tmp.is_file() and not target.is_dir():
        os.replace(tmp, target)
        return
    old = temp_path(target, "old")
    try:
        if os.path.lexists(target):
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(old):
            remove(old)


def _fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path):
    if path.is_dir():
        for root, _, names in os.walk(path):
            for name in names:
                _fsync_path(Path(root) / name)
            _fsync_path(Path(root))
    else:
        _fsync_path(path)
