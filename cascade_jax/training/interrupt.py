"""Stopping a training run on Ctrl-C (SIGINT) or SIGTERM without losing what it trained.

While :func:`cascade_jax.training.train` runs it holds a :class:`StopSignals`. The first signal does
not raise in the middle of an update: it asks the loop to stop after the update in flight, and the
loop writes a checkpoint at that update, waits for the asynchronous save and raises
:class:`TrainingInterrupted`. Where nothing trained can be lost — building the models, restoring a
checkpoint, waiting for data, compiling — the first signal abandons that work at once instead (the
checkpoint is then of the last completed update). A second signal while the checkpoint is written
is ignored with a note; a third exits at once without it (Orbax commits a checkpoint by renaming a
finished temporary folder, so an abandoned save leaves the previous checkpoint as the resume point).

The trainer scripts wrap their work in :func:`exit_status`: an interruption prints where the run
stopped and the command that resumes it, without a traceback, and exits with 128 + the signal
(130 for Ctrl-C, 143 for SIGTERM).

Multi-host: every process must stop at the same update (a checkpoint save is collective). SIGTERM
is left to JAX's preemption service (installed by ``jax.distributed.initialize``), a Ctrl-C is
forwarded to it as SIGTERM, and the processes agree on the update to stop after through
``multihost_utils.reached_preemption_sync_point``; nothing is abandoned mid-way there.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading

import jax

from cascade_jax.training.console import say
from cascade_jax.storage import atomic

_ACTIVE: list["StopSignals"] = []  # the installed handler (signal handlers are per process)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``step`` is its last completed update, saved in ``checkpoint_dir``
    (None: stopped while setting up, before the loop knew where it resumes)."""

    def __init__(self, signum: int, step: int | None, checkpoint_dir):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        super().__init__(f"{signal.Signals(signum).name}: " + self.where())

    def where(self) -> str:
        if self.step is None:
            return "stopped while setting up; nothing new to save"
        if self.step == 0:
            return "stopped before the first update; nothing trained to save"
        return f"stopped after update {self.step}; checkpoint in {self.checkpoint_dir}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Abandoned(KeyboardInterrupt):
    """Raised by the handler where the work in progress can be dropped without losing a trained update."""


class StopSignals:
    """Installs SIGINT/SIGTERM handlers for its ``with`` block (main thread only; elsewhere it only
    asks the preemption service, if any) and restores the previous ones after."""

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self.multi = jax.process_count() > 1
        if self.multi and not _preemption_service():
            say("note: JAX's preemption service is off (jax_enable_preemption_service): on several processes "
                "Ctrl-C and SIGTERM end training without a checkpoint of the updates since the last save")
        self._abandonable = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread() and not (self.multi and not _preemption_service()):
            # Multi-host: SIGTERM belongs to JAX's preemption notifier (a C handler Python could not restore).
            for signum in (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    # Python runs this in the main thread between bytecodes, never inside XLA or a file write.
    def _handle(self, signum, frame):
        self.count += 1
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.count == 1:
            self.signum = signum
            if self.multi:
                os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service: every process learns of it
            if self._abandonable:
                raise Abandoned(f"{name}: stopping")
            _notify(f"\n{name}: stopping after the update in progress and saving a checkpoint")
        elif self.count == 2:
            _notify(f"{name}: still saving the checkpoint, please wait ({name} once more quits without it)")
        else:
            _notify(f"{name}: quitting without the checkpoint in progress\n"
                    f"resume from the last complete checkpoint with: {resume_command()}")
            with contextlib.suppress(RuntimeError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(128 + signum)

    _handle.graceful = True  # storage.atomic leaves this SIGTERM handler in place while it writes a file

    @contextlib.contextmanager
    def abandonable(self):
        """Within the block the first signal raises :class:`Abandoned` at once (not on several hosts: they
        must stop together)."""
        if self.multi:
            yield
            return
        if self.signum is not None:
            raise Abandoned("stopping")
        self._abandonable += 1
        try:
            yield
        finally:
            self._abandonable -= 1

    def requested(self, step: int) -> bool:
        """Whether to stop after update ``step`` (called after every update, on every process)."""
        if self.multi and _preemption_service():
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None


def _notify(text: str):
    """``say`` from a signal handler: if the signal interrupted a write to stdout, Python's buffered stream
    refuses a reentrant write; the text then goes straight to the stderr file descriptor."""
    try:
        say(text)
    except RuntimeError:
        if jax.process_index() == 0:
            os.write(2, (text + "\n").encode())


def _preemption_service() -> bool:
    from jax._src import distributed  # where jax.distributed.initialize keeps it (multihost_utils reads it too)

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def call_abandonably(fn):
    """``fn()``, run on a worker thread while the main thread waits when a :class:`StopSignals` is
    installed, so that a signal can abandon it: a compile holds the thread that calls it inside XLA,
    where Python cannot run a signal handler until it returns (minutes for a large model)."""
    if not _ACTIVE or _ACTIVE[-1].multi or threading.current_thread() is not threading.main_thread():
        return fn()
    result = {}

    def work():
        try:
            result["value"] = fn()
        except BaseException as err:  # handed to the waiting thread
            result["error"] = err

    worker = threading.Thread(target=work, name="cascade-compile", daemon=True)
    with _ACTIVE[-1].abandonable():
        worker.start()
        worker.join()  # a signal interrupts the wait: the handler raises Abandoned here
    if "error" in result:
        raise result["error"]
    return result["value"]


def resume_command(argv=None) -> str:
    """The command line that runs this script again as it was started (it resumes from the checkpoint)."""
    argv = list(sys.argv if argv is None else argv)
    found = shutil.which("python")
    python = "python" if found and os.path.abspath(found) == sys.executable else sys.executable
    return shlex.join([python, *argv])


def exit_status(fn) -> int:
    """``fn()`` (a trainer script's work, returning its exit status); an interruption prints where the
    run stopped and how to resume, with no traceback, and returns 128 + the signal. The script is to
    exit then: from there on SIGINT and SIGTERM are ignored (another Ctrl-C would print a traceback)."""
    try:
        return fn()
    except TrainingInterrupted as stop:
        _ignore_signals()
        say(stop.where(), f"resume with: {resume_command()}")
        return stop.exit_code
    except KeyboardInterrupt as err:  # outside the loop (loading a config, exporting): its writes are atomic
        _ignore_signals()
        signum = signal.SIGTERM if isinstance(err, atomic.Interrupted) else signal.SIGINT
        say("interrupted outside the training loop", f"run the same command again to continue: {resume_command()}")
        return 128 + signum


def _ignore_signals():
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
