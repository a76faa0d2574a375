"""Each compile of a plan in a fresh process, so host memory is the largest single compile's, not their sum.

A process keeps much of the host memory its XLA compiles took (the compiler's arenas, the programs and
jaxprs JAX caches): the 3.6B step, its FLOPs trace and the time estimate's two shallow compiles in one
process passed 8 GiB where the step alone took 6.7 (docs/planning.md). ``run_in_child("module:function",
*args)`` starts a new interpreter (the "spawn" way: nothing inherited but the environment and ``sys.path``),
imports the function by name, calls it with the pickled arguments and hands back its pickled value, with the
child's wall time, CPU time and peak RSS (its own rusage, read by ``wait4``: exact also when it was killed).

A child that raises hands its exception back (:meth:`ChildOutcome.result` raises it here); one that dies
(the kernel's out-of-memory killer, a crash in the compiler, the time limit) gives an outcome whose
``error`` says how, so a caller can keep what the other children measured.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

GIB = 2 ** 30
BOOTSTRAP = ("import json, sys; sys.path[:0] = json.loads(sys.argv[3]); "
             "from cascade_jax.training.plan_isolation import child_main; sys.exit(child_main(sys.argv[1], sys.argv[2]))")


class ChildDiedError(RuntimeError):
    """A child process ended without a result (killed, crashed, or stopped at the time limit)."""


@dataclasses.dataclass
class ChildOutcome:
    """What one task gave: ``value``, or ``exception`` (it raised), or only ``error`` (it died)."""

    task: str
    value: Any = None
    exception: BaseException | None = None
    error: str | None = None  # why there is no value; None when there is
    wall_s: float = 0.0
    cpu_s: float | None = None
    peak_rss_gib: float | None = None  # the child's own peak; None for a task run in this process

    def result(self):
        """The value, or the task's failure raised here (its own exception, or :class:`ChildDiedError`)."""
        if self.exception is not None:
            raise self.exception
        if self.error is not None:
            raise ChildDiedError(f"{self.task}: {self.error}")
        return self.value

    def summary(self) -> dict:
        """The task's cost (and failure), for a report."""
        out = {"task": self.task, "wall_s": round(self.wall_s, 1),
               "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 1), "peak_rss_gib": self.peak_rss_gib}
        if self.error is not None:
            out["error"] = self.error
        return out


def in_process(task: str, function, *args, **kwargs) -> ChildOutcome:
    """``function(*args, **kwargs)`` here, as an outcome (an ``Exception`` is kept, not raised)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        value, exception = function(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - the caller decides (ChildOutcome.result re-raises)
        value, exception = None, err
    return ChildOutcome(task, value, exception, None if exception is None else describe_exception(exception),
                        time.perf_counter() - start, time.process_time() - cpu)


def run_in_child(task: str, function: str, *args, timeout_s: float | None = None,
                 memory_limit_gib: float | None = None, **kwargs) -> ChildOutcome:
    """``function`` ("package.module:name") called with the arguments in a fresh Python process (see the module
    docstring). The child is stopped after ``timeout_s`` seconds or above ``memory_limit_gib`` of resident
    memory (read from /proc: Linux), and the outcome says so. Its stdout goes to stderr (this process's stdout
    may carry a report)."""
    with tempfile.TemporaryDirectory(prefix="cascade_jax_child_") as folder:
        call, result = Path(folder) / "call.pickle", Path(folder) / "result.pickle"
        call.write_bytes(pickle.dumps((function, args, kwargs)))
        command = [sys.executable, "-c", BOOTSTRAP, str(call), str(result), json.dumps(sys.path)]
        start = time.perf_counter()
        process = subprocess.Popen(command)
        usage, stopped = wait_reaping(process, timeout_s, memory_limit_gib)
        outcome = ChildOutcome(task, wall_s=time.perf_counter() - start, cpu_s=usage.ru_utime + usage.ru_stime,
                               peak_rss_gib=round(maxrss_bytes(usage.ru_maxrss) / GIB, 2))
        if result.is_file() and stopped is None:
            try:
                kind, payload = pickle.loads(result.read_bytes())
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
                kind, payload = "died", f"its result could not be read ({type(err).__name__}: {err})"
            if kind == "value":
                outcome.value = payload
                return outcome
            if kind == "exception":
                outcome.exception, outcome.error = payload, describe_exception(payload)
                return outcome
        outcome.error = stopped or death_reason(process.returncode, outcome.peak_rss_gib)
        return outcome


def wait_reaping(process: subprocess.Popen, timeout_s: float | None, memory_limit_gib: float | None):
    """(the child's rusage, why it was stopped or None): ``wait4`` gives this child's own peak RSS and CPU
    time. An interrupt here (Ctrl-C) kills the child before it propagates: no compile is left running."""
    start, stopped, watch = time.perf_counter(), None, timeout_s is not None or memory_limit_gib is not None
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG if watch else 0)
            if pid:
                break
            elapsed, rss = time.perf_counter() - start, resident_bytes(process.pid)
            if stopped is None and timeout_s is not None and elapsed > timeout_s:
                stopped = f"stopped at the time limit ({timeout_s:.0f} s)"
            if stopped is None and memory_limit_gib is not None and rss > memory_limit_gib * GIB:
                stopped = f"stopped at the host-memory limit ({memory_limit_gib:g} GiB) after {elapsed:.0f} s"
            if stopped is not None:
                os.kill(process.pid, signal.SIGKILL)
            time.sleep(0.25)
    except BaseException:
        process.kill()
        process.wait()
        raise
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return usage, stopped


def resident_bytes(pid: int) -> int:
    """A process's resident memory now (0 where /proc does not say: the memory limit needs Linux)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def death_reason(returncode: int, peak_rss_gib: float) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = " (most often the kernel's out-of-memory killer)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{why} at {peak_rss_gib} GiB host RSS"
    return f"exited with status {returncode} without a result (its stderr above says why)"


def describe_exception(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def maxrss_bytes(maxrss: int) -> int:
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def resolve(function: str):
    module, _, name = function.partition(":")
    if not name:
        raise ValueError(f"{function!r}: name the function as package.module:function")
    return getattr(importlib.import_module(module), name)


def child_main(call_path: str, result_path: str) -> int:
    """The child's side: call, then write ("value", v) or ("exception", e) to ``result_path``."""
    os.dup2(2, 1)  # prints go to stderr: the parent's stdout may be a report
    function, args, kwargs = pickle.loads(Path(call_path).read_bytes())
    try:
        outcome = ("value", resolve(function)(*args, **kwargs))
    except BaseException as err:  # noqa: BLE001 - handed to the parent, which decides (MemoryError included)
        outcome = ("exception", picklable(err, traceback.format_exc()))
    Path(result_path).write_bytes(pickle.dumps(outcome))
    sys.stdout.flush()
    return 0


def picklable(err: BaseException, child_traceback: str) -> BaseException:
    """``err`` with the child's traceback as a note, or a RuntimeError saying what it was if it cannot be pickled."""
    err.add_note(f"in the child process:\n{child_traceback.rstrip()}")
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any pickling failure: hand back its text instead
        plain = RuntimeError(f"{type(err).__name__}: {err}")
        plain.add_note(f"in the child process:\n{child_traceback.rstrip()}")
        return plain
