"""Conversion of full-size official-format checkpoints: time and peak resident memory.

Random checkpoints with the real layout (names and PyTorch shapes from the model's
``expected_torch_shapes``, bfloat16 as released) are written to a scratch folder with the
streaming ``write_safetensors`` (one tensor in memory at a time), then converted in a child
process per measurement. Targets: peak memory <= 1.3x the output size, time within 2x
of a plain read-and-write of the same bytes; the baseline runs before and after the
conversion in the same run. Everything generated is deleted at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from benchmarks.harness import BENCH_DIR, log, other_cpu_load, skipped
from benchmarks.shared_weights import PooledGenerator
from cascade_jax.models.registry import abstract_model

BF16 = np.dtype(ml_dtypes.bfloat16)
MEMORY_GOAL = 1.3
TIME_GOAL = 2.0
MEMORY_NEED_X = 4.5  # observed peak RSS / output size of the converter (Orbax deep copy + zstd buffers + mmap pages)


def write_random_checkpoint(model_name: str, config: dict, path: Path, seed: int = 0) -> dict:
    """Official-layout random bf16 safetensors at ``path``, streamed tensor by tensor."""
    from cascade_jax.weights.safetensors_io import write_safetensors
    from cascade_jax.weights.tree import expected_torch_shapes

    shapes = expected_torch_shapes(abstract_model(model_name, config))
    gen = PooledGenerator(seed)
    specs = [(key, BF16, shape) for key, shape in shapes.items()]
    start = time.perf_counter()
    write_safetensors(path, specs, lambda key: (0.02 * gen.standard_normal(shapes[key])).astype(BF16))
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    return {"path": str(path), "tensors": len(shapes), "params": n_params, "file_bytes": path.stat().st_size,
            "write_s": time.perf_counter() - start}


def run_child(args: list[str], poll_s: float = 0.05) -> dict:
    """Run convert_child.py; its own report plus the parent's view (wall time, polled peak RSS)."""
    import psutil

    cmd = [sys.executable, str(BENCH_DIR / "convert_child.py"), *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    handle = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}): {stderr[-2000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    return {**report, "process_wall_s": wall, "polled_peak_rss_gb": peak / 2**30}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_one(model_name: str, config: dict, label: str, scratch: Path, out_dtype: str) -> dict:
    src = scratch / f"{label}_bf16.safetensors"
    result = {"label": label, "model": model_name, "output_dtype": out_dtype, "load_before": other_cpu_load()}
    result["source"] = write_random_checkpoint(model_name, config, src)
    log(f"convert: wrote {src.name} ({result['source']['file_bytes'] / 2**30:.2f} GiB) in "
        f"{result['source']['write_s']:.1f}s")
    config_file = scratch / f"{label}_config.json"
    config_file.write_text(json.dumps({"model": model_name, "config": config}))
    copy_dst, out_dir = scratch / f"{label}_copy.bin", scratch / f"{label}_converted"
    baselines = []
    try:
        baselines.append(run_child(["copy", str(src), str(copy_dst)]))
        copy_dst.unlink()
        conv = run_child(["convert", model_name, str(config_file), str(src), str(out_dir), out_dtype])
        result["output_disk_bytes"] = dir_bytes(out_dir)
        shutil.rmtree(out_dir)
        baselines.append(run_child(["copy", str(src), str(copy_dst)]))
        copy_dst.unlink()
    finally:
        for path in (copy_dst, out_dir, src, config_file):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
    itemsize = 2 if out_dtype == "bfloat16" else 4
    output_bytes = result["source"]["params"] * itemsize
    baseline_s = sum(b["seconds"] for b in baselines) / len(baselines)
    peak = max(conv["peak_rss_gb"], conv["polled_peak_rss_gb"])
    start_rss = conv["phases_gb"].get("work", {}).get("VmRSS", 0.0)  # interpreter + jax/orbax libraries
    peaks = conv["phases_gb"].values()
    anon_peak = max(p.get("RssAnon", 0.0) for p in peaks) - conv["phases_gb"].get("work", {}).get("RssAnon", 0.0)
    result.update(
        baseline_copy=[{k: b[k] for k in ("seconds", "peak_rss_gb", "process_wall_s")} for b in baselines],
        convert=conv, output_array_bytes=output_bytes, baseline_s=baseline_s,
        time_ratio_vs_copy=conv["seconds"] / baseline_s if baseline_s else None,
        peak_rss_gb=peak, peak_over_output=peak * 2**30 / output_bytes,
        rss_at_start_gb=start_rss, net_peak_over_output=(peak - start_rss) * 2**30 / output_bytes,
        anon_growth_over_output=anon_peak * 2**30 / output_bytes,
        goals={"memory_ratio": MEMORY_GOAL, "time_ratio": TIME_GOAL},
        load_after=other_cpu_load())
    result["meets_memory_goal"] = result["peak_over_output"] <= MEMORY_GOAL
    result["meets_time_goal"] = result["time_ratio_vs_copy"] is not None and result["time_ratio_vs_copy"] <= TIME_GOAL
    log(f"convert {label} -> {out_dtype}: {conv['seconds']:.1f}s (copy {baseline_s:.1f}s, x{result['time_ratio_vs_copy']:.2f}); "
        f"peak RSS {peak:.2f} GiB = {result['peak_over_output']:.2f}x output")
    return result


def run_convert_section(budget, targets: list[tuple], scratch_dir: str | None = None,
                        out_dtype="bfloat16") -> list[dict]:
    """``targets``: (label, model_name, config). Skips what the budget, disk or memory cannot take."""
    import psutil

    results = []
    scratch = Path(tempfile.mkdtemp(prefix="cascade_bench_convert_", dir=scratch_dir))
    try:
        for label, model_name, config in targets:
            n_params = sum(int(np.prod(v.shape)) for v in
                           __import__("cascade_jax.weights.tree", fromlist=["x"]).named_variables(
                               abstract_model(model_name, config)).values())
            gb = n_params * 2 / 2**30
            est = 25 * gb + 15  # write the source, copy twice, convert twice (measured ~33 s/GiB on a busy machine)
            free_disk = shutil.disk_usage(scratch).free / 2**30
            available = psutil.virtual_memory().available / 2**30
            if not budget.fits(est):
                results.append({"label": label, **skipped(f"estimated {est:.0f}s exceeds the remaining budget "
                                                           f"{budget.remaining():.0f}s")})
            elif free_disk < 3.5 * gb:
                results.append({"label": label, **skipped(f"needs {3.5 * gb:.1f} GiB of scratch disk, "
                                                           f"{free_disk:.1f} GiB free in {scratch}")})
            elif available < MEMORY_NEED_X * gb + 1:
                results.append({"label": label, **skipped(f"needs about {MEMORY_NEED_X * gb + 1:.1f} GiB of memory "
                                                           f"(the converter peaked at ~{MEMORY_NEED_X}x the bf16 "
                                                           f"output in earlier runs), "
                                                           f"{available:.1f} GiB available")})
            elif budget.dry_run:
                budget.consume(est)
                results.append({"label": label, **skipped(f"dry run: would run, ~{est:.0f}s")})
            else:
                try:
                    results.append(measure_one(model_name, config, label, scratch, out_dtype))
                except Exception as e:  # noqa: BLE001 - recorded; the next target still runs
                    results.append({"label": label, "error": f"{type(e).__name__}: {e}"})
            if "skipped" in results[-1] or "error" in results[-1]:
                log(f"convert {label}: {results[-1].get('skipped') or results[-1].get('error')}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results
