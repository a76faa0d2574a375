"""File operations on local paths and URLs alike (reads), and whole-object writes to URLs.

Every remote call goes through :func:`faults.retrying`. Object stores publish an object whole or not
at all, so a URL write is atomic by itself: :func:`write_bytes` is one PUT, and :func:`open_write`
aborts its upload (nothing appears) when the block inside raises. Local writes stay with the
project's temp-and-rename helper (``cascade_jax.storage.atomic``).
"""

from __future__ import annotations

import contextlib
import os

from cascade_jax.storage.backends import filesystem
from cascade_jax.storage.faults import retrying
from cascade_jax.storage.urls import is_url, local


def _remote(url, action: str, method: str, *args, **kwargs):
    fs, path = filesystem(url)
    return retrying(str(url), action, getattr(fs, method), path, *args, **kwargs)


def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(local(path))
    return _remote(path, "check", "exists")


def isfile(path) -> bool:
    if not is_url(path):
        return os.path.isfile(local(path))
    return _remote(path, "check", "isfile")


def isdir(path) -> bool:
    """A local folder, or a URL prefix that holds at least one object."""
    if not is_url(path):
        return os.path.isdir(local(path))
    return _remote(path, "check", "isdir")


def read_bytes(path) -> bytes:
    if not is_url(path):
        with open(local(path), "rb") as f:
            return f.read()
    return _remote(path, "read", "cat_file")


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def read_range(path, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (fewer at the end of the file): one ranged GET for a URL."""
    if size <= 0:
        return b""
    if not is_url(path):
        with open(local(path), "rb") as f:
            f.seek(offset)
            return f.read(size)
    return _remote(path, "read", "cat_file", start=offset, end=offset + size)


def _version(info: dict) -> str:
    """What changes when an object is replaced: GCS generation, S3 ETag (or a local mtime)."""
    for key in ("generation", "ETag", "etag", "mtime_ns", "LastModified", "updated", "mtime"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def stat(path) -> dict:
    """``{"size": bytes, "version": generation/ETag/mtime}``: with the URL, the key of derived caches."""
    if not is_url(path):
        st = os.stat(local(path))
        return {"size": st.st_size, "version": str(st.st_mtime_ns)}
    info = _remote(path, "read", "info")
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{path} is a folder (a prefix), not an object")
    return {"size": int(info["size"]), "version": _version(info)}


def listing(folder) -> dict[str, dict]:
    """Every file under ``folder`` (recursively): ``{relative posix path: stat}``, in one paged listing for a URL."""
    if not is_url(folder):
        root = local(folder)
        found = {}
        for directory, _, files in os.walk(root):
            for name in files:
                full = os.path.join(directory, name)
                found[os.path.relpath(full, root).replace(os.sep, "/")] = stat(full)
        return found
    fs, path = filesystem(folder)
    details = retrying(str(folder), "list", fs.find, path, detail=True)
    prefix = path.rstrip("/") + "/"
    return {name[len(prefix):]: {"size": int(info.get("size") or 0), "version": _version(info)}
            for name, info in details.items() if name.startswith(prefix) and info.get("type") != "directory"}


def glob(pattern) -> list[tuple[str, dict]]:
    """(URL or path, stat) of every file matching the glob ``pattern``, sorted."""
    if not is_url(pattern):
        import glob as globbing

        return [(p, stat(p)) for p in sorted(globbing.glob(local(pattern))) if os.path.isfile(p)]
    fs, path = filesystem(pattern)
    details = retrying(str(pattern), "list", fs.glob, path, detail=True)
    protocol = str(pattern).split("://", 1)[0]
    return [(f"{protocol}://{name}", {"size": int(info.get("size") or 0), "version": _version(info)})
            for name, info in sorted(details.items()) if info.get("type") != "directory"]


def write_bytes(url, data: bytes) -> None:
    """One object, published whole (a single PUT)."""
    _remote(url, "write", "pipe_file", bytes(data))


def write_text(url, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


@contextlib.contextmanager
def open_write(url):
    """A file to stream one object into; the object appears when the block ends, not if it raises."""
    fs, path = filesystem(url)
    handle = retrying(str(url), "write", fs.open, path, "wb")
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(Exception):
            handle.discard()  # aborts the multipart / resumable upload: no partial object
        handle.closed = True  # so that no later close() (at garbage collection) uploads what was buffered
        raise
    retrying(str(url), "write", handle.close)


def upload(local_path, url) -> None:
    """A local file to one object (a multipart upload completes whole or leaves nothing)."""
    fs, path = filesystem(url)
    retrying(str(url), "write", fs.put_file, str(local_path), path)


def download(url, local_path) -> None:
    fs, path = filesystem(url)
    retrying(str(url), "read", fs.get_file, path, str(local_path))


def remove(url, recursive: bool = False) -> None:
    """Delete an object (or every object under a prefix); absent is fine."""
    fs, path = filesystem(url)
    try:
        retrying(str(url), "delete", fs.rm, path, recursive=recursive)
    except FileNotFoundError:
        pass
