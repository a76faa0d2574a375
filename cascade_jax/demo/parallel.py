"""The demo recipe's training steps in processes of their own, ``SLOTS`` at a time, each pinned to its share
of the CPUs and started with glibc's huge pages: what makes the recipe fit its hour on 2 cores. The numbers
the trainers compute do not depend on any of it (``parallel=False`` runs the same steps in order).
"""

from __future__ import annotations

import contextlib
import os

# What each training step needs. The steps run in processes of their own, two at a time, each pinned to its
# share of the CPUs: XLA:CPU runs these small convolutions on about one core, so on a 2-core machine two steps
# take the time of the longer one; unpinned, the two processes' thread pools contend (measured on 2 cores:
# Stage B 1.0 updates/s beside Stage C unpinned, 1.8 pinned). The order is the priority: the EfficientNet and
# Stage A train side by side, then Stage C and Stage B, then the Previewer on whichever CPU frees first.
NEEDS = {"effnet": (), "stage_a": (), "stage_c": ("effnet",), "stage_b": ("stage_a", "effnet"),
         "previewer": ("effnet",)}
SLOTS = 2
# XLA:CPU takes each update's scratch memory (118 MB for Stage B) from malloc, above glibc's mmap threshold, so
# every update maps fresh memory and faults in ~29,000 zeroed 4-KiB pages: 15% of Stage B's time went to the
# kernel. Asked to, glibc (2.35+) backs such mappings with transparent huge pages, ~60 faults an update (Stage B
# on one core: 3.31 -> 3.82 updates/s, docs/experiments.md). The numbers computed do not change. glibc
# reads the variable when a process starts, so it is set for the spawned trainers; other C libraries ignore it.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_tunable(tunables: str | None, tunable: str) -> str:
    """``GLIBC_TUNABLES`` with ``tunable`` added, unless it already sets that name (the user's choice wins)."""
    parts = [p for p in (tunables or "").split(":") if p]
    if tunable.split("=")[0] not in {p.split("=")[0] for p in parts}:
        parts.append(tunable)
    return ":".join(parts)


def slot_cpus(index: int, slots: int) -> set | None:
    """The CPUs of slot ``index`` of ``slots``: an even split of this process's CPUs (None when the platform
    cannot pin or there are fewer CPUs than slots)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < slots:
        return None
    share = len(cpus) // slots
    return set(cpus[index * share:(index + 1) * share])


@contextlib.contextmanager
def huge_pages_for_children():
    """Within the block, processes started get ``HUGE_PAGES`` in ``GLIBC_TUNABLES``; this one's is restored."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = with_tunable(tunables, HUGE_PAGES)  # what the spawned trainers start with
    try:
        yield
    finally:
        if tunables is None:
            os.environ.pop("GLIBC_TUNABLES")
        else:
            os.environ["GLIBC_TUNABLES"] = tunables


def pin(cpus):
    """Pin this process to ``cpus`` (None: leave it), before it starts JAX's thread pools."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def run_parallel(todo: list, target, args) -> list:
    """``target(*args, stage, cpus)`` for each stage of ``todo`` in a spawned process, ``SLOTS`` at a time, each
    started as soon as what it ``NEEDS`` is done and a slot is free; returns the stages that failed."""
    from multiprocessing import connection, get_context

    context = get_context("spawn")  # not fork: this process has initialised JAX, whose threads a fork drops
    done, running, failed = set(NEEDS) - set(todo), {}, []
    while todo or running:
        ready = [s for s in todo if set(NEEDS[s]) <= done] if not failed else []
        for slot in [i for i in range(SLOTS) if i not in running][:len(ready)]:
            stage = ready.pop(0)
            todo.remove(stage)
            running[slot] = (stage, context.Process(target=target, args=(*args, stage, slot_cpus(slot, SLOTS))))
            running[slot][1].start()
        if not running:
            break  # a failure left steps that cannot start
        connection.wait([process.sentinel for _, process in running.values()])
        for slot, (stage, process) in list(running.items()):
            if process.exitcode is not None:
                del running[slot]
                if process.exitcode == 0:
                    done.add(stage)
                else:
                    failed.append(stage)
    return failed
