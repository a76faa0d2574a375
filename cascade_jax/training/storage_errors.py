"""A full disk while checkpointing: one message naming the folder, not hundreds of Orbax log lines.

Orbax writes checkpoints on background threads; when the disk fills, each of them logs its
traceback through absl (~570 lines for one save of a toy state) before the main thread sees the
error. :func:`quiet_orbax_noise` drops those records while the checkpointer is open (other records
pass), and :func:`storage_errors` turns the error the main thread gets into :class:`DiskFullError`.
Orbax commits a step by renaming its temporary folder, so the earlier checkpoints stay intact.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import traceback

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")


class DiskFullError(OSError):
    """The checkpoint folder's disk (or quota) is full; the checkpoints written before are intact."""


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an exception it was raised from is an out-of-space error (OSError or tensorstore's text)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        if any(text in str(err) for text in FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


class QuietDiskFull(logging.Filter):
    """Drops log records about an out-of-space write (their message or attached exception)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += "".join(traceback.format_exception_only(record.exc_info[1]))
        return not any(t in text for t in FULL_TEXTS)


def quiet_orbax_noise():
    """Silence what a failed Orbax write leaves behind: its threads' out-of-space tracebacks (absl log) and the
    "Event loop is closed" errors of tensorstore callbacks that outlive Orbax's event loop (reported through
    ``sys.unraisablehook``). Returns the function that undoes it."""
    quiet, previous = QuietDiskFull(), sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    logging.getLogger("absl").addFilter(quiet)
    sys.unraisablehook = hook

    def undo():
        logging.getLogger("absl").removeFilter(quiet)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous

    return undo


@contextlib.contextmanager
def storage_errors(directory, intact_steps=lambda: []):
    """Re-raise an out-of-space error inside the block as one :class:`DiskFullError` naming ``directory``."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        steps = list(intact_steps())
        kept = f"the checkpoints before it are intact (steps {steps})" if steps else "no checkpoint was completed"
        raise DiskFullError(f"disk full at {directory}: a checkpoint could not be written; {kept}. Free space there "
                            "(or set another checkpoint_path) and run the same command again to resume") from None
