"""Object storage: every path a user gives may be a local path or a ``gs://``, ``s3://`` or other fsspec URL.

The lowest layer of the library (it imports nothing else of cascade_jax). Call sites use these
functions where they used ``os``/``open``/``Path`` for a path that may be remote:

* ``urls``: ``is_url``, ``join``, ``parent``, ``name``, ``with_suffix``, ``absolute`` (pure strings);
* ``files``: ``exists``/``isfile``/``isdir``, ``read_bytes``/``read_text``/``read_range``, ``stat`` (size and
  generation/ETag), ``listing``, ``glob``; for URLs ``write_bytes``/``write_text``/``open_write`` (an object
  appears whole or not at all), ``upload``, ``remove``;
* ``staging``: ``local_copy`` / ``mirror`` for readers that need local files; ``cache_root``;
* ``blocks``: ``RangeReader`` (header scans) and ``BlockCache`` (streaming with read-ahead);
* ``checks``: ``check_readable`` / ``check_writable`` before any long work; ``orbax_path`` for checkpoints
  (``gs://`` natively, ``s3://`` once ``orbax_s3`` has taught Orbax TensorStore's s3 driver);
* ``faults``: retries with backoff (counted: ``fault_counts``), one clear message per permanent fault.

fsspec and the cloud filesystems (gcsfs, s3fs) come with the ``cloud`` extra and are imported only when
a URL is used: local paths need none of them.
"""

from cascade_jax.storage.checks import check_readable, check_writable, orbax_path
from cascade_jax.storage.faults import StorageError, count, fault_counts
from cascade_jax.storage.files import (exists, glob, isdir, isfile, listing, open_write, read_bytes, read_range,
                                       read_text, remove, stat, upload, write_bytes, write_text)
from cascade_jax.storage.staging import cache_root, local_copy, mirror
from cascade_jax.storage.urls import absolute, bucket_of, is_url, join, name, parent, scheme, split, with_suffix

__all__ = ["StorageError", "absolute", "bucket_of", "cache_root", "check_readable", "check_writable", "count", "exists",
           "fault_counts", "glob", "is_url", "isdir", "isfile", "join", "listing", "local_copy", "mirror", "name",
           "open_write", "orbax_path", "parent", "read_bytes", "read_range", "read_text", "remove", "scheme", "split",
           "stat", "upload", "with_suffix", "write_bytes", "write_text"]
