"""One measured conversion (or the plain-copy baseline) in its own process.

    python benchmarks/convert_child.py copy SRC DST
    python benchmarks/convert_child.py convert MODEL CONFIG SRC OUT_DIR DTYPE

Prints one JSON line: seconds of the work itself (imports excluded), this process's peak
resident memory ``VmHWM`` (not ``ru_maxrss``: after fork + exec that one starts from the
*parent's* high-water mark, so a large parent inflates it), and a memory trace sampled from
/proc/self/status every 20 ms, split into phases (for ``convert``: reading + layout change
until the Orbax save starts, then the save), with anonymous (heap) and file-backed
(memory-mapped source pages) resident memory apart, and each phase's duration.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time

CHUNK = 64 << 20


def _status_kb() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(rest.split()[0])
    return fields


class MemoryTrace:
    """Peak VmRSS / RssAnon / RssFile per named phase, sampled in a background thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.phase, self.peaks = interval, "start", {}
        self.started = {"start": time.perf_counter()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self):
        now = _status_kb()
        peak = self.peaks.setdefault(self.phase, {})
        for key, kb in now.items():
            peak[key] = max(peak.get(key, 0), kb)

    def mark(self, phase: str):
        self.sample()
        self.phase = phase
        self.started[phase] = time.perf_counter()
        self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def report_gb(self) -> dict:
        return {phase: {k: round(v / 2**20, 3) for k, v in peak.items() if k != "VmHWM"}
                for phase, peak in self.peaks.items()}

    def durations_s(self) -> dict:
        marks = sorted(self.started.items(), key=lambda kv: kv[1]) + [("end", time.perf_counter())]
        return {name: round(t1 - t0, 3) for (name, t0), (_, t1) in zip(marks, marks[1:])}


def copy_file(src: str, dst: str) -> int:
    """Plain read-and-write of the same bytes, in 64 MB chunks (no fsync, like the converter)."""
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while True:
            n = fin.readinto(buf)
            if not n:
                break
            fout.write(view[:n])
            total += n
    return total


def convert(model: str, config: str, src: str, out_dir: str, dtype: str, trace: MemoryTrace) -> None:
    from cascade_jax.weights import convert as convert_module

    original_save = convert_module.checkpoint.save

    def traced_save(*args, **kwargs):
        trace.mark("orbax_save")
        try:
            return original_save(*args, **kwargs)
        finally:
            trace.mark("after_save")

    convert_module.checkpoint.save = traced_save  # instrumentation only: marks when the save phase starts
    trace.mark("read_and_convert")
    try:
        convert_module.convert_checkpoint(model, config, src, out_dir, dtype=dtype, overwrite=True)
    finally:
        convert_module.checkpoint.save = original_save


def main(argv):
    mode = argv[1]
    if mode == "convert":
        # Imports are not conversion time: load them before the clock starts.
        import jax  # noqa: F401
        import orbax.checkpoint  # noqa: F401

        import cascade_jax.weights.convert  # noqa: F401
    with MemoryTrace() as trace:
        trace.mark("work")
        start = time.perf_counter()
        if mode == "copy":
            copied = copy_file(argv[2], argv[3])
        elif mode == "convert":
            convert(argv[2], argv[3], argv[4], argv[5], argv[6], trace)
            copied = None
        else:
            raise SystemExit(f"unknown mode {mode!r}; use copy or convert")
        seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "seconds": seconds, "bytes_copied": copied,
                      "peak_rss_gb": _status_kb()["VmHWM"] / 2**20,
                      "ru_maxrss_gb_inflated_by_parent": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "phases_gb": trace.report_gb(), "phase_s": trace.durations_s(), "pid": os.getpid()}))


if __name__ == "__main__":
    main(sys.argv)
