"""Shared helpers of the benchmark scripts: timing, statistics, machine state, budgets, results.

Benchmarks are measurements, never pass/fail tests: every script writes what it measured
(or why it skipped something) to ``benchmarks/results/*.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# fp32 flops per cycle and core: two 256-bit FMA pipes (AVX2: Zen 3 / Zen 4, client cores) = 2 x 8 lanes x 2;
# server cores with AVX-512 run two 512-bit FMA pipes = 2 x 16 x 2 (a 2-core AVX-512 Xeon here multiplied
# 263 GFLOP/s at 2.3 GHz: 57 flops per cycle, past what AVX2 can do).
AVX2_FP32_FLOPS_PER_CYCLE = 32
AVX512_FP32_FLOPS_PER_CYCLE = 64


# ---- statistics -------------------------------------------------------------------------------

def summarize(samples: list[float]) -> dict:
    """Median, spread and the raw samples (seconds)."""
    if not samples:
        return {"n": 0}
    med = statistics.median(samples)
    return {"n": len(samples), "median_s": med, "min_s": min(samples), "max_s": max(samples),
            "spread_pct": 100.0 * (max(samples) - min(samples)) / med if med > 0 else 0.0,
            "samples_s": [round(s, 4) for s in samples]}


def ratio(a: dict, b: dict) -> float | None:
    """median(a) / median(b), or None when either is missing."""
    if not a.get("n") or not b.get("n") or not b["median_s"]:
        return None
    return a["median_s"] / b["median_s"]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runs: dict[str, Callable[[], object]], n: int, warmup: int = 0) -> dict[str, list[float]]:
    """Time each callable ``n`` times, interleaved A B, B A, A B ... so drifting machine load hits
    every contender alike; ``warmup`` untimed interleaved rounds first. Callables must block
    until their result is ready."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples = {name: [] for name in names}
    for i in range(n):
        for name in (names if i % 2 == 0 else names[::-1]):
            samples[name].append(timed(runs[name]))
    return samples


# ---- machine state ----------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_mhz() -> float | None:
    """Nominal clock from /proc/cpuinfo (the hypervisor's figure; turbo is not visible in a VM)."""
    try:
        values = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("cpu MHz")]
        return max(values) if values else None
    except (OSError, ValueError):
        return None


def has_avx512() -> bool:
    try:
        return any(line.startswith("flags") and " avx512f" in line
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def nominal_peak_gflops(cores: int | None = None) -> dict:
    """fp32 peak = cores x clock x flop/cycle (two FMA pipes: 32 with AVX2, 64 with AVX-512); how it was
    derived goes along."""
    cores = cores or os.cpu_count()
    mhz = cpu_mhz()
    if mhz is None:
        return {"gflops": None, "how": "clock unknown"}
    per_cycle, pipes = ((AVX512_FP32_FLOPS_PER_CYCLE, "AVX-512: two 512-bit FMA pipes per core") if has_avx512()
                        else (AVX2_FP32_FLOPS_PER_CYCLE, "AVX2: two 256-bit FMA pipes per core"))
    return {"gflops": cores * mhz / 1e3 * per_cycle,
            "how": f"{cores} cores x {mhz:.0f} MHz (/proc/cpuinfo) x {per_cycle} fp32 flop/cycle ({pipes})"}


def other_cpu_load(interval: float = 0.5) -> dict:
    """Load average and the CPU share of processes other than this one and its children."""
    out = {"loadavg_1m": round(os.getloadavg()[0], 2)}
    try:
        import psutil
    except ImportError:
        return out
    me = psutil.Process()
    mine = {me.pid} | {c.pid for c in me.children(recursive=True)}
    procs = [p for p in psutil.process_iter() if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    time.sleep(interval)
    busy = 0.0
    for p in procs:
        try:
            busy += p.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    out["other_processes_cpu_pct"] = round(busy, 1)  # 100 = one core fully used by others
    out["available_mem_gb"] = round(psutil.virtual_memory().available / 2**30, 2)
    return out


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch", "diffusers"):
        try:
            module = __import__(name, fromlist=["__version__"])
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = None
    return found


def machine_info() -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": versions(),
            "nominal_peak_fp32": nominal_peak_gflops()}
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def rss_gb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def free_memory():
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back so RSS readings mean something
    except OSError:
        pass


# ---- budget -----------------------------------------------------------------------------------

_SIMULATED_S = [0.0]  # --dry-run: estimated seconds of the cases that would have run


@dataclasses.dataclass
class Budget:
    """Wall-clock budget of a whole run; sections ask whether an estimated cost still fits.

    With ``dry_run`` nothing heavy runs: a case that fits is recorded with its estimate and its
    estimated seconds count as spent, so the plan of a whole run shows in seconds."""

    total_s: float
    dry_run: bool = False
    start: float = dataclasses.field(default_factory=time.perf_counter)
    simulated_at_start: float = dataclasses.field(default_factory=lambda: _SIMULATED_S[0])

    def elapsed(self) -> float:
        simulated = _SIMULATED_S[0] - self.simulated_at_start if self.dry_run else 0.0
        return time.perf_counter() - self.start + simulated

    def consume(self, seconds: float):
        _SIMULATED_S[0] += seconds

    def child(self, total_s: float) -> Budget:
        return Budget(total_s, self.dry_run)

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def fits(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        return estimate_s <= self.remaining() - reserve_s


def skipped(reason: str, **extra) -> dict:
    return {"skipped": reason, **extra}


# ---- results ----------------------------------------------------------------------------------

def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    return value


def write_text(path, text: str):
    """``text`` to ``path`` (its folder made), through a temp sibling: a killed run leaves the old result.
    ``path`` may be a bucket URL (gs://, s3://): one object, published whole."""
    from cascade_jax import storage
    from cascade_jax.storage import atomic

    if storage.is_url(path):
        storage.write_text(path, text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)


def write_report(out, report: dict, table: str):
    """``report`` as JSON to ``out`` (a path or bucket URL) and ``table`` (markdown) beside it as .md; the table
    is printed."""
    from cascade_jax import storage

    write_text(out, json.dumps(report, indent=1))
    write_text(storage.with_suffix(out, ".md"), table)
    print(table)


def write_json(path, data: dict):
    write_text(path, json.dumps(to_jsonable(data), indent=1))


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
