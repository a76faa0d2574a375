"""What went wrong with a URL, said once and clearly; transient faults retried with backoff and counted.

Permanent faults (a missing bucket or object, a permission error, a bucket in another region) are
raised at once as ``FileNotFoundError`` / ``PermissionError`` / ``StorageError`` naming the URL and what
to check. Transient ones (timeouts, refused or reset connections, 5xx, throttling) are retried with
exponential backoff for up to ``CASCADE_JAX_STORAGE_RETRY_SECONDS`` (default 120 s), each retry logged as
a warning and counted (:func:`fault_counts`); the retries that gcsfs makes inside one call are counted
from its log records, since it offers no other hook.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import threading
import time

from cascade_jax.storage.backends import filesystem
from cascade_jax.storage.urls import bucket_of

logger = logging.getLogger("cascade_jax.storage")
_counts: collections.Counter = collections.Counter()
_counts_lock = threading.Lock()

_TRANSIENT_STATUS = re.compile(r"\b(408|429|500|502|503|504)\b")
_TRANSIENT_WORDS = ("slowdown", "slow down", "throttl", "serviceunavailable", "service unavailable", "internalerror",
                    "internal error", "requesttimeout", "too many requests", "timed out", "timeout",
                    "connection reset", "connection refused", "connection aborted", "cannot connect",
                    "could not connect", "server disconnected", "remote end closed", "broken pipe",
                    "temporarily unavailable", "bad gateway", "gateway time")
_REGION_WORDS = ("permanentredirect", "authorizationheadermalformed", "illegallocationconstraint",
                 "wrong region", "incorrectendpoint", "must be addressed using the specified endpoint")
_BUCKET_MISSING_WORDS = ("nosuchbucket", "bucket does not exist", "specified bucket does not exist")


class StorageError(OSError):
    """A storage fault that retrying does not fix (wrong region, retries used up); names the URL."""


def fault_counts() -> dict[str, int]:
    """``{"retries": n, "skipped_corrupt": m, ...}`` since the process started (what the logs show)."""
    with _counts_lock:
        return dict(_counts)


def count(kind: str, n: int = 1) -> None:
    with _counts_lock:
        _counts[kind] += n


def retry_budget_s() -> float:
    return float(os.environ.get("CASCADE_JAX_STORAGE_RETRY_SECONDS", "120"))


def _text(err: BaseException) -> str:
    parts = [type(err).__name__, str(err)]
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err:
        parts += [type(cause).__name__, str(cause)]
    return " ".join(parts).lower()


def is_transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, StorageError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = _text(err)
    if any(word in text for word in _REGION_WORDS):
        return False
    code = getattr(err, "code", None) or getattr(err, "status", None)
    if isinstance(code, int) and code in (408, 429, 500, 502, 503, 504):
        return True
    return bool(_TRANSIENT_STATUS.search(text)) or any(word in text for word in _TRANSIENT_WORDS)


def explain(url: str, err: BaseException, action: str) -> BaseException:
    """The exception to raise for a permanent fault: one message naming the URL and what to check."""
    text = _text(err)
    what = f"cannot {action} {url}"
    if any(word in text for word in _REGION_WORDS):
        return StorageError(f"{what}: the bucket is in another region ({err}); set AWS_REGION (or AWS_DEFAULT_REGION) "
                            f"to the bucket's region")
    if isinstance(err, PermissionError) or "forbidden" in text or "accessdenied" in text or "access denied" in text:
        return PermissionError(f"{what}: permission denied; check the credentials (application default credentials "
                               f"for gs://, the AWS environment or profile for s3://) and the bucket's access rights")
    if isinstance(err, FileNotFoundError):
        if any(word in text for word in _BUCKET_MISSING_WORDS) or bucket_missing(url):
            return FileNotFoundError(f"{what}: the bucket {bucket_of(url)} does not exist (check the name, and "
                                     f"AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST if you use one)")
        return FileNotFoundError(f"{what}: no such object or folder")
    return err


def bucket_missing(url: str) -> bool:
    """Whether ``url``'s bucket is known not to exist (False when that cannot be told)."""
    try:
        fs, bucket = filesystem(bucket_of(url))
        fs.ls(bucket, detail=False)
        return False
    except FileNotFoundError:
        return True
    except Exception:  # noqa: BLE001 - undecidable (permissions, network): say nothing about the bucket
        return False


def retrying(url: str, action: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with transient faults retried (backoff 0.2 s doubling to 10 s, jittered)
    until the retry budget is spent; permanent faults explained at once."""
    count_library_retries()
    deadline = time.monotonic() + retry_budget_s()
    delay, attempt = 0.2, 0
    while True:
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below; anything unknown is re-raised as it is
            if not is_transient(err):
                raise explain(url, err, action) from err
            if time.monotonic() + delay > deadline:
                raise StorageError(f"cannot {action} {url}: {type(err).__name__}: {err} (still failing after {attempt} "
                                   f"tries over {retry_budget_s():.0f} s; is the endpoint reachable? "
                                   f"CASCADE_JAX_STORAGE_RETRY_SECONDS sets how long to retry)") from err
            count("retries")
            logger.warning("retrying %s of %s in %.1f s (attempt %d): %s: %s", action, url, delay, attempt,
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)


# What gcsfs and s3fs log (at DEBUG) when they retry a request inside one call; they offer no other hook.
_LIBRARY_RETRY_MESSAGES = {"gcsfs": ("retrying after exception",),
                           "s3fs": ("Retryable error", "SlowDown", "reduce your request rate")}


class _LibraryRetryCounter(logging.Handler):
    """Counts the retries a cloud filesystem makes inside one request; its warnings and errors go on to
    the root logger as before, its debug records nowhere (as before: nobody had asked for them)."""

    def __init__(self, library: str):
        super().__init__()
        self.library = library

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno < logging.WARNING and any(m in message for m in _LIBRARY_RETRY_MESSAGES[self.library]):
            count("retries")
            logger.warning("%s retried a request: %s", self.library, message.splitlines()[0][:300])
        elif record.levelno >= logging.WARNING:
            logging.getLogger().handle(record)


_hooked: set = set()


def count_library_retries() -> None:
    for name in _LIBRARY_RETRY_MESSAGES:
        library = logging.getLogger(name)
        if name in _hooked or library.getEffectiveLevel() <= logging.DEBUG:  # a user reading its debug log keeps it
            continue
        _hooked.add(name)
        library.addHandler(_LibraryRetryCounter(name))
        library.setLevel(logging.DEBUG)
        library.propagate = False
