"""Paths that may be URLs: ``gs://bucket/key``, ``s3://bucket/key``, any fsspec URL, or a local path.

Pure string functions, no I/O. ``pathlib.Path`` folds ``gs://b/k`` into ``gs:/b/k``, so code that may
hold a URL joins and splits with these instead. ``file://`` URLs are local paths.
"""

from __future__ import annotations

import os
import posixpath
import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme(path) -> str | None:
    """``gs`` for ``gs://b/k``; None for a local path (``file://`` URLs included)."""
    match = _SCHEME.match(str(path))
    if match is None or match.group(1).lower() in ("file", "local"):
        return None
    return match.group(1).lower()


def is_url(path) -> bool:
    """True for a remote URL (``gs://``, ``s3://``, ``memory://``, ...); False for a local path."""
    return scheme(path) is not None


def local(path) -> str:
    """A local path as a string (``file:///x`` -> ``/x``, ``~`` expanded)."""
    text = str(path)
    match = _SCHEME.match(text)
    if match is not None:
        text = text[match.end():]
        if not text.startswith("/"):
            text = "/" + text
    return os.path.expanduser(text)


def join(base, *parts) -> str:
    """``base/part/...`` for URLs and local paths alike (a URL keeps its ``//``)."""
    if not is_url(base):
        return os.path.join(local(base), *map(str, parts))
    text = str(base).rstrip("/")
    for part in map(str, parts):
        text = f"{text}/{part.strip('/')}" if part.strip("/") else text
    return text


def split(path) -> tuple[str, str]:
    """(parent, name); the parent of ``gs://b/k`` is ``gs://b``."""
    if not is_url(path):
        return os.path.split(local(path).rstrip("/") or "/")
    text = str(path).rstrip("/")
    head, _, name = text.rpartition("/")
    if head.endswith(":/"):  # gs://bucket: the bucket is the top
        return text, ""
    return head, name


def parent(path) -> str:
    return split(path)[0]


def name(path) -> str:
    return split(path)[1]


def with_suffix(path, suffix: str) -> str:
    """``gs://b/x/gen`` -> ``gs://b/x/gen.safetensors`` (replacing an existing suffix, as pathlib does)."""
    head, base = split(path)
    stem, _ = posixpath.splitext(base)
    return join(head, (stem or base) + suffix)


def bucket_of(url: str) -> str:
    """``gs://bucket`` of ``gs://bucket/a/b``."""
    match = _SCHEME.match(url)
    rest = url[match.end():] if match else url
    return f"{match.group(0) if match else ''}{rest.split('/', 1)[0]}"


def absolute(path) -> str:
    """URLs as they are (without a trailing ``/``); local paths absolute."""
    return str(path).rstrip("/") if is_url(path) else os.path.abspath(local(path))
