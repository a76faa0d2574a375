"""What the demo recipe's trainers gain from glibc's transparent huge pages (``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1``, which ``train/demo.py`` sets for its trainer processes). XLA:CPU mallocs each
update's scratch memory (118 MB for the demo Stage B); glibc maps an allocation that large fresh every time
and frees it after, so with 4-KiB pages the kernel faults all of it in again on every update.

Each variant trains the demo Stage B (``configs/training/demo_b.yaml``) for ``--updates`` updates in a child
process pinned to one CPU, one variant after the other, from the shipped demo cascade's Stage A, EfficientNet
and text encoder on ``--images`` generated images. A variant's rate is the median of the trainer's logged
updates/s after its first two log windows (the compilations). The losses must come out equal in every
variant (``same_losses``): the setting changes the speed only.

    python benchmarks/bench_host_memory.py              # -> benchmarks/results/host_memory.json (~6 min)
    python benchmarks/bench_host_memory.py --updates 100 --images 64 --out /tmp/h.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, log, machine_info, other_cpu_load, write_json

LOG_EVERY = 25
# name -> GLIBC_TUNABLES; the last one is what the demo recipe runs
VARIANTS = {"glibc_default": None, "huge_pages": "glibc.malloc.hugetlb=1"}


def child(spec: dict) -> dict:
    """One variant: ``spec`` = {work, name, updates, cpu}; returns the trainer's logged rates and losses."""
    os.sched_setaffinity(0, {spec["cpu"]})  # before JAX starts its thread pools
    from cascade_jax.training import load_config, train
    from cascade_jax.demo.recipe import stage_overrides

    work, name = Path(spec["work"]), spec["name"]
    cfg = load_config("demo_b", stage_overrides(work, "stage_b", 1.0, {}) + [
        f"experiment_id={name}", f"checkpoint_path={work / 'runs' / name}", f"output_path={work / 'runs' / name}",
        f"updates={spec['updates']}", "save_every=1000000", f"log_every={LOG_EVERY}"])
    start = time.perf_counter()
    run = train(cfg, progress=False)
    return {"wall_s": round(time.perf_counter() - start, 1),
            "updates_per_s_windows": [round(h["steps_per_s"], 3) for h in run.history if "steps_per_s" in h],
            "losses": [h["loss"] for h in run.history]}


def prepare(work: Path, images: int):
    """The layout ``stage_overrides`` reads, from the shipped demo weights and freshly generated images."""
    from cascade_jax import demo
    from cascade_jax.demo import shapes
    from cascade_jax.demo.recipe import ENCODERS

    shapes.write_folder(work / "data", images, 0, size=demo.IMAGE_SIZE)
    (work / "encoders").mkdir()
    (work / "trained").mkdir()
    for name in (*ENCODERS, "tokenizer"):  # the shipped folder holds them as the recipe's encoders/ does
        (work / "encoders" / name).symlink_to(demo.WEIGHTS_DIR / name)
    (work / "trained" / "stage_a").symlink_to(demo.WEIGHTS_DIR / "stage_a")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=250)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "host_memory.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.updates < 3 * LOG_EVERY:
        p.error(f"--updates must be at least {3 * LOG_EVERY} (two log windows of compilation, then timing)")
    cpu = max(os.sched_getaffinity(0))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.images)
        for name, tunables in VARIANTS.items():
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            spec = {"work": str(work), "name": name, "updates": args.updates, "cpu": cpu}
            log(f"{name}: {args.updates} updates on CPU {cpu}")
            load = other_cpu_load()
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            result["updates_per_s"] = statistics.median(result["updates_per_s_windows"][2:])
            result["glibc_tunables"], result["other_cpu_load_before"] = tunables, load
            results[name] = result
            log(f"{name}: {result['updates_per_s']:.2f} updates/s")
    base = results["glibc_default"]["updates_per_s"]
    report = {"what": "demo Stage B training updates/s on one CPU, glibc's default pages vs transparent huge pages",
              "machine": machine_info(), "updates": args.updates, "images": args.images, "variants": results,
              "speedup_vs_glibc_default": {k: round(v["updates_per_s"] / base, 3) for k, v in results.items()},
              "same_losses": len({json.dumps(v["losses"]) for v in results.values()}) == 1}
    write_json(args.out, report)
    log(f"{json.dumps(report['speedup_vs_glibc_default'])}, same losses: {report['same_losses']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
