"""Reading large remote files in blocks: a seekable reader for header scans, and a bounded block
cache with read-ahead for streaming a file front to back.

A tar's member headers sit between the members' data. :class:`RangeReader` fetches ``block_size``
bytes from wherever a read starts (one ranged GET), so the headers of small members come many to a
request and a member larger than a block is skipped without being downloaded. :class:`BlockCache`
serves reads from aligned blocks shared by all threads, fetches the next block of a file in the
background as soon as one is first used, and keeps at most ``capacity`` blocks (bounded memory).
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from cascade_jax.storage.files import read_range

DEFAULT_BLOCK = 4 * 1024 * 1024


class RangeReader:
    """A read-only, seekable file over ranged reads of ``path`` (``size`` bytes long)."""

    def __init__(self, path: str, size: int, block_size: int = DEFAULT_BLOCK):
        self.path, self.size, self.block_size = path, size, block_size
        self._position, self._start, self._buffer = 0, 0, b""

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._position + n)
        if end <= self._position:
            return b""
        if not (self._start <= self._position and end <= self._start + len(self._buffer)):
            self._start = self._position
            self._buffer = read_range(self.path, self._start, max(end - self._start, self.block_size))
        data = self._buffer[self._position - self._start:end - self._start]
        self._position += len(data)
        return data

    def close(self) -> None:
        self._buffer = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BlockCache:
    """``read(path, offset, size)`` from aligned blocks, with the following block fetched ahead."""

    def __init__(self, block_size: int = DEFAULT_BLOCK, capacity: int = 8, sizes: dict | None = None):
        self.block_size, self.capacity = block_size, max(capacity, 2)
        self.sizes = sizes or {}  # path -> file size, so no block is fetched past the end
        self._blocks: collections.OrderedDict[tuple, Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="cascade-readahead")

    def _block(self, path: str, index: int, ahead: bool = False) -> Future | None:
        key = (path, index)
        with self._lock:
            future = self._blocks.get(key)
            if future is not None:
                self._blocks.move_to_end(key)
                return future
            if ahead and index * self.block_size >= self.sizes.get(path, float("inf")):
                return None
            future = self._pool.submit(read_range, path, index * self.block_size, self.block_size)
            self._blocks[key] = future
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
        if not ahead:
            self._block(path, index + 1, ahead=True)  # read-ahead: the next block is usually next
        return future

    def read(self, path: str, offset: int, size: int) -> bytes:
        parts, position, end = [], offset, offset + size
        while position < end:
            index, within = divmod(position, self.block_size)
            try:
                data = self._block(path, index).result()
            except Exception:
                with self._lock:  # a failed fetch is not cached: the next read tries again
                    self._blocks.pop((path, index), None)
                raise
            piece = data[within:within + end - position]
            if not piece:
                break
            parts.append(piece)
            position += len(piece)
        return b"".join(parts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
