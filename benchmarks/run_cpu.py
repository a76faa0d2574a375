"""The CPU benchmark set (``make bench``): JAX against diffusers' PyTorch side by side, float32.

Sections, in order of priority, each writing ``benchmarks/results/<section>.json``:
  forward   per-stage forward at 1024^2 shapes, lite and full configs, batch 1 and 2
  pipeline  lite text-to-image, 20+10 steps: compile, steady state, sampling-loop overhead
  convert   full-size official-format checkpoints -> converted directories: time, peak memory
  train     the library's train step, tiny/lite Stage C and B, remat, cached conditions: steps/s, MFU, memory
  train_torch  one training update (forward, backward, AdamW) of a small Stage C and Stage B, JAX against
            PyTorch (diffusers' U-Net, the official GDF loss, torch AdamW), same weights and batch
then ``results/summary.md`` (and the marked section of docs/benchmarks.md, if it has the markers
``<!-- bench:start -->`` / ``<!-- bench:end -->``).

The whole run keeps to a wall-clock budget (default 19 min on a 2-core machine): every case
estimates its cost from XLA's flop count and the measured matmul rate, and what does not fit
is recorded as skipped with the reason, never dropped silently.

    python benchmarks/run_cpu.py                 # the default set, ~19 min
    python benchmarks/run_cpu.py --quick         # a smaller set, ~10 min
    python benchmarks/run_cpu.py --full          # every case, no budget (an hour or more)
    python benchmarks/run_cpu.py --only forward,convert --budget 900
    python benchmarks/run_cpu.py --tiny          # tiny configs, ~2 min, results/tiny/ (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Budget, log, machine_info, write_json  # noqa: E402

SECTIONS = ("forward", "pipeline", "convert", "train", "train_torch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller set (~10 min)")
    mode.add_argument("--full", action="store_true", help="every case, more repeats, no time budget")
    mode.add_argument("--tiny", action="store_true", help="tiny configs and shapes: a 2-minute smoke test")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 1140, --quick 600)")
    p.add_argument("--pipeline-size", type=int, default=None, help="force the pipeline's image size")
    p.add_argument("--scratch", default=None, help="folder for the generated checkpoints (default: system temp)")
    p.add_argument("--results", default=None, help="results folder (default benchmarks/results[/tiny])")
    p.add_argument("--train-lite", action="store_true", help="--quick: also try the lite training steps (~15-18 GiB each)")
    p.add_argument("--dry-run", action="store_true",
                   help="run nothing heavy: print each case's estimated seconds and what the budget would skip")
    return p.parse_args(argv)


def throughput_probe() -> dict:
    """fp32 matmul rate of JAX and PyTorch on this machine now (the 'measured peak')."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    m, k, n = 1152, 2048, 8192  # one Stage C ResBlock matmul at batch 2
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    f = jax.jit(jnp.matmul)
    runs = {"jax": lambda: f(ja, jb).block_until_ready(), "torch": lambda: torch.matmul(ta, tb)}
    samples = harness.alternate(runs, 5, warmup=1)
    flops = 2 * m * k * n
    return {name: flops / min(s) / 1e9 for name, s in samples.items()} | {"shape_mkn": [m, k, n]}


def main(argv=None):
    args = parse_args(argv)
    import torch
    torch.set_num_threads(os.cpu_count())
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    total = args.budget or (600 if args.quick else 300 if args.tiny else 1e9 if args.full else 1140)
    budget = Budget(total, dry_run=args.dry_run)
    default_dir = "dry_run" if args.dry_run else "tiny" if args.tiny else ""
    results_dir = Path(args.results) if args.results else harness.RESULTS_DIR / default_dir
    mode = "tiny" if args.tiny else "quick" if args.quick else "full" if args.full else "default"
    from benchmarks import cpu_sections
    info = {**machine_info(), "mode": mode, "budget_s": total, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_at_start": harness.other_cpu_load(1.0)}
    log(f"benchmarks ({mode}, budget {total:.0f}s): {info['cpu']}, {info['cores']} cores, "
        f"load {info['load_at_start']}")
    info["matmul_probe_gflops"] = throughput_probe()
    gflops = min(info["matmul_probe_gflops"]["jax"], info["matmul_probe_gflops"]["torch"])
    log(f"matmul probe: {info['matmul_probe_gflops']}")
    write_json(results_dir / "machine.json", info)
    runners = {
        "forward": lambda b: cpu_sections.forward(b, mode, gflops),
        "pipeline": lambda b: cpu_sections.pipeline(b, mode, gflops, args.pipeline_size),
        "convert": lambda b: cpu_sections.convert(b, mode, args.scratch),
        "train": lambda b: cpu_sections.train(b, mode, gflops, info["nominal_peak_fp32"], args.train_lite),
        "train_torch": lambda b: cpu_sections.train_torch(b, mode),
    }
    for section in SECTIONS:
        if section not in sections:
            continue
        reserve = sum(reserves_after(section, sections, mode).values())
        section_budget = budget.child(max(0.0, budget.remaining() - reserve))
        log(f"== {section}: {section_budget.total_s:.0f}s of {budget.remaining():.0f}s left")
        start = time.perf_counter()
        try:
            data = runners[section](section_budget)
        except Exception as e:  # noqa: BLE001 - a failed section is recorded; the others still run
            import traceback
            data = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
            log(f"{section} failed: {data['error']}")
        write_json(results_dir / f"{section}.json", {"machine": info, "section_s": time.perf_counter() - start,
                                                     "results": data})
        harness.free_memory()
    from benchmarks import report
    summary = report.write_summary(results_dir)
    if not (args.tiny or args.dry_run):
        report.update_benchmarks_page(summary)
    log(f"done in {budget.elapsed():.0f}s; results in {results_dir}")


def reserves_after(section: str, selected: list[str], mode: str) -> dict:
    """Budget kept for the selected sections that come after ``section``."""
    scale = {"quick": 0.75, "tiny": 0.1, "full": 0.0}.get(mode, 1.0)
    later = SECTIONS[SECTIONS.index(section) + 1:]
    table = {"pipeline": 230, "convert": 150, "train": 110, "train_torch": 150}
    return {s: table[s] * scale for s in later if s in selected}


if __name__ == "__main__":
    main()
