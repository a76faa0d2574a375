"""Compiled programs kept in a bounded least-recently-used cache, each freed when it is dropped.

A long-running process (the app) meets an unbounded number of shapes and settings; each compiled
program holds tens of MB (executable, buffers, the traced jaxpr), so the pipeline keeps at most
``max_size`` of them per cache and compiles a dropped one again when it is asked for.

Dropping must really free: jax caches traces, lowerings and executables keyed by a weak reference
to the traced *function* (up to thousands of entries). A module-level function never dies, so
every program jitted from it would stay cached inside jax whatever this cache drops. ``fresh_jit``
therefore traces a new function object per program: when the program leaves this cache, nothing
refers to that function any more and jax's entries for it go too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import jax

MAX_PROGRAMS = 8  # per cache (e.g. one stage's sampling loops): 8 sizes / step counts alive at once


def fresh_jit(fn: Callable, **jit_kwargs):
    """``jax.jit`` of a new function object that calls ``fn`` (named like it, so the program's name and
    the persistent compilation cache's key are the same as for ``jax.jit(fn)``)."""
    def program(*args):
        return fn(*args)
    program.__name__, program.__qualname__ = fn.__name__, fn.__qualname__
    return jax.jit(program, **jit_kwargs)


class ProgramCache:
    """``{signature: compiled program}`` holding at most ``max_size`` entries (least recently used first out)."""

    def __init__(self, max_size: int = MAX_PROGRAMS):
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        self.max_size = max_size
        self._programs: OrderedDict = OrderedDict()
        self.compiles = 0  # programs compiled (and stored) so far, evicted ones included

    def get(self, signature):
        program = self._programs.get(signature)
        if program is not None:
            self._programs.move_to_end(signature)
        return program

    def put(self, signature, program):
        self._programs[signature] = program
        self._programs.move_to_end(signature)
        self.compiles += 1
        while len(self._programs) > self.max_size:
            self._programs.popitem(last=False)

    def __len__(self):
        return len(self._programs)

    def __iter__(self):
        return iter(list(self._programs))

    def __contains__(self, signature):
        return signature in self._programs

    def values(self):
        return list(self._programs.values())

    def clear(self):
        self._programs.clear()
