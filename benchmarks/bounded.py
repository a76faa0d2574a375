"""Run a command under a host-memory watchdog: its process tree is killed above a resident-set limit.

A 3.6B compile can take more than 20 GB of host memory; on a shared machine the kernel's OOM killer would
then take someone else's process. This samples the summed RSS of the child and its descendants every
``interval`` seconds, kills the group above ``limit_gib`` and reports the peak and the wall time.

    python benchmarks/bounded.py --limit-gib 8 -- python train/train_c.py finetune_c_1b --plan v5p-16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

import psutil

GIB = 2 ** 30


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def run_bounded(command: list[str], limit_gib: float, *, timeout_s: float | None = None, interval: float = 0.25,
                **popen_kwargs) -> dict:
    """Run ``command``; returns rc, wall_s, cpu_s (its processes' CPU time), peak_rss_gib, and killed
    ("rss" | "timeout" | None)."""
    start, cpu_before = time.perf_counter(), _children_cpu_s()
    child = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    proc, peak, killed = psutil.Process(child.pid), 0, None
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        over_time = timeout_s is not None and time.perf_counter() - start > timeout_s
        if peak > limit_gib * GIB or over_time:
            killed = "rss" if not over_time else "timeout"
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            break
        time.sleep(interval)
    if child.returncode is None:
        child.wait()
    return {"rc": child.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(_children_cpu_s() - cpu_before, 1), "peak_rss_gib": round(peak / GIB, 2),
            "limit_gib": limit_gib, "killed": killed}


def _children_cpu_s() -> float:
    """User + system CPU seconds of the waited-for children so far (what a loaded machine does not inflate)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-gib", type=float, default=8.0, help="kill the command above this RSS (GiB)")
    parser.add_argument("--timeout-s", type=float, default=None, help="and after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    result = run_bounded(command, args.limit_gib, timeout_s=args.timeout_s)
    print(json.dumps({"command": command, **result}), file=sys.stderr)
    return result["rc"] if result["killed"] is None else 137


if __name__ == "__main__":
    sys.exit(main())
