"""Dry-run table: what a training step needs per device on a mesh, before renting it (issue 10).

Each case compiles the train step of a ``configs/training`` config for a simulated mesh of N CPU devices
(``--xla_force_host_platform_device_count``, one child process per case: the device count is fixed when
JAX starts) from abstract shapes, with ``cascade_jax.training.plan``: no weights, no data. It records XLA's
per-device memory analysis (arguments = the sharded train state and batch, temporaries, outputs less
what the donated state aliases) and the step's FLOPs per device.

These are XLA:CPU's numbers: the same partitioning as on GPU/TPU, but the CPU compiler fuses and schedules
differently, so the arguments (parameters, AdamW
moments, EMA, batch) are exact and the temporaries are not a GPU/TPU estimate: Stage C 3.6B at FSDP 8,
8 images of 768² a device, compiled here to 5.3 GiB of arguments but 207 GiB of XLA:CPU temporaries.

    python benchmarks/dry_run.py            # Stage C 3.6B over 8 and 64 devices, 13+ min a case
    python benchmarks/dry_run.py --tiny     # tiny_c over 8 devices (smoke test), ~1 min
    python benchmarks/dry_run.py --only 'FSDP 8'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = BENCH_DIR / "results" / "dry_run.json"
# (label, config, devices, overrides): the official Stage C 3.6B finetune (768², remat full, bf16 compute,
# float32 master weights) at 8 images per device, parameters and optimizer state sharded over every device.
CASES = [
    ("Stage C 3.6B, FSDP 8", "finetune_c_3b", 8, ["mesh.data=1", "mesh.fsdp=8", "batch_size=64"]),
    ("Stage C 3.6B, FSDP 64", "finetune_c_3b", 64, ["mesh.data=1", "mesh.fsdp=64", "batch_size=512"]),
    ("Stage C 3.6B, data 8 x FSDP 8", "finetune_c_3b", 64, ["mesh.data=8", "mesh.fsdp=8", "batch_size=512"]),
]
TINY_CASES = [("tiny C, FSDP 8", "tiny_c", 8, ["mesh.data=1", "mesh.fsdp=8", "batch_size=8"])]
COLUMNS = ("argument", "temp", "output", "alias", "peak")


def child(config: str, overrides: list[str]) -> dict:
    from cascade_jax.training import load_config
    from cascade_jax.training.plan import plan

    cfg = load_config(config, overrides)
    return {**plan(cfg), "batch_size": cfg.batch_size, "image_size": cfg.image_size}


def run_case(label: str, config: str, devices: int, overrides: list[str], timeout_s: float) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip())
    start = time.perf_counter()
    case = {"label": label, "config": config, "devices": devices, "overrides": overrides}
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", config, *overrides], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout_s:.0f} s"}
    case["wall_s"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return {**case, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def markdown(report: dict) -> str:
    lines = ["# Training step dry run (XLA memory analysis, per device)", "",
             f"{report['date']}; jax {report['jax']}, simulated CPU devices. GiB per device: arguments (train state "
             "and batch shards), XLA temporaries, outputs, aliased (the donated state the outputs reuse), peak = "
             "arguments + outputs + temporaries - aliased. TFLOP per step per device from XLA's cost analysis.", "",
             "| case | devices | mesh | global batch @ image | trainable params | " + " | ".join(COLUMNS)
             + " | TFLOP / device | compile s |", "|---" * (6 + len(COLUMNS) + 1) + "|"]
    for c in report["cases"]:
        if "error" in c:
            lines.append(f"| {c['label']} | {c['devices']} | – | – | – | " + " | ".join("–" for _ in COLUMNS)
                         + f" | – | error: {c['error']} |")
            continue
        mesh = " × ".join(f"{k} {v}" for k, v in c["mesh"].items() if v > 1) or "1 device"
        mem = " | ".join(f"{c.get(f'{name}_gib_per_device', 0.0):.2f}" for name in COLUMNS)
        lines.append(f"| {c['label']} | {c['devices']} | {mesh} | {c['batch_size']} @ {c['image_size']}² | "
                     f"{_count(c['trainable_params'])} | {mem} | {c['flops_per_step_per_device'] / 1e12:.1f} | "
                     f"{c['compile_s']:.0f} |")
    return "\n".join(lines + ["", "XLA:CPU's temporaries are an estimate of a GPU/TPU compile's; the arguments are "
                              "exact (see benchmarks/dry_run.py).", ""])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1], argv[2:])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny smoke case only")
    p.add_argument("--only", default=None, help="run the cases whose label contains this text")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case (default 1800)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT}); .md beside it")
    args = p.parse_args(argv)
    import datetime

    import jax

    from benchmarks.harness import write_text

    cases = []
    chosen = [c for c in (TINY_CASES if args.tiny else CASES) if args.only is None or args.only in c[0]]
    for label, config, devices, overrides in chosen:
        print(f"{label}: compiling for {devices} devices ...", flush=True)
        case = run_case(label, config, devices, overrides, args.timeout)
        print(json.dumps(case), flush=True)
        cases.append(case)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "jax": jax.__version__, "cases": cases}
    write_text(args.out, json.dumps(report, indent=1))
    write_text(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 1 if any("error" in c for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
