"""TensorBoard event files in buckets, through the storage layer (endpoints, retries) for every scheme.

An object cannot be appended to: the writer keeps the file's bytes (scalars: kilobytes) and replaces
the object with all of them on each flush, as tensorboardX's own S3 writer does. Registered for a
URL's scheme the first time a log folder there is opened.
"""

from __future__ import annotations

import io

from cascade_jax.storage import files
from cascade_jax.storage.urls import scheme


class BucketEventWriter:
    def __init__(self, url: str):
        self.url, self.buffer, self.closed = url, io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        files.write_bytes(self.url, self.buffer.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class BucketEventWriterFactory:
    def open(self, path: str) -> BucketEventWriter:
        return BucketEventWriter(path)

    def directory_check(self, path: str) -> None:
        pass  # a prefix needs no folder


def register_for(url: str) -> None:
    """Make tensorboardX write event files under ``url`` through :class:`BucketEventWriter`."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme(url), BucketEventWriterFactory())
