"""Checks made before any compile or long work: can this URL be read, can that one be written.

A missing bucket or object, a permission error or a bucket in another region surfaces here as one
message naming the URL, instead of minutes later inside a training step or an Orbax save.
"""

from __future__ import annotations

import os
import socket

from cascade_jax.storage import backends, files, orbax_s3
from cascade_jax.storage.urls import is_url, join, scheme

# Orbax writes and reads its checkpoints through TensorStore, whose kvstore Orbax builds natively for
# gs:// (and local paths) only; s3:// once orbax_s3 has taught it. Any other scheme would fail deep inside a save.
ORBAX_SCHEMES = ("gs", "s3")


def check_readable(path, what: str = "input") -> None:
    """``path`` (a file or a folder/prefix) exists; else a clear error naming it."""
    if not is_url(path):
        if not os.path.exists(os.path.expanduser(str(path))):
            raise FileNotFoundError(f"{what} {path} does not exist")
        return
    if files.exists(path):
        return
    from cascade_jax.storage.faults import explain

    raise explain(str(path), FileNotFoundError(str(path)), f"read the {what}")


def check_writable(folder, what: str = "output") -> None:
    """The bucket of ``folder`` exists and accepts a write there (a small probe object, deleted again)."""
    if not is_url(folder):
        return
    probe = join(folder, f".cascade_jax-write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        files.write_bytes(probe, b"")
    except (FileNotFoundError, PermissionError, OSError) as err:
        raise type(err)(f"cannot write the {what} {folder}: {err}") from None
    files.remove(probe)


def orbax_path(path, what: str = "checkpoint folder") -> str:
    """``path`` for Orbax: local (made absolute) or a URL Orbax writes natively, with TensorStore told the
    endpoint; other URLs are refused now with what works instead."""
    if not is_url(path):
        return os.path.abspath(os.path.expanduser(str(path)))
    supported = [s for s in ORBAX_SCHEMES if s != "s3" or orbax_s3.install()]
    if scheme(path) not in supported:
        raise ValueError(f"{what} {path}: Orbax checkpoints (train checkpoints, converted weight folders) go to "
                         f"local paths or {', '.join(s + '://' for s in supported)} URLs, which it writes through "
                         f"TensorStore with its commit protocol; {scheme(path)}:// is not one. Use a gs:// bucket, a "
                         f"local folder, or a mounted bucket (e.g. mountpoint-s3) as a local path")
    backends.configure()
    return str(path).rstrip("/")
