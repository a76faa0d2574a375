"""One prepared GPU call: the released cascade (Stage C 3.6B + Stage B 1.5B + Stage A) with random
weights in bfloat16, batch 4 at 1024^2, 20 + 10 steps, JAX against diffusers' UNets on the same
card in the same process, then the library's Stage C training step (largest batch that fits) and its MFU. Run it through gpu.sh.

Each part is timed twice (the first run includes compilation or PyTorch's warm-up) and writes
into ``gpu_results.json`` as soon as it finishes, so a run cut short keeps what it measured; a
part that fails records its error and the next one still runs. Parts that would start after
the deadline are recorded as skipped.

    python benchmarks/gpu_bench.py [--tiny] [--out DIR] [--deadline-s 400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.gpu_cases import PUBLISHED  # noqa: E402


class Run:
    """Results, written after every part; the deadline decides which parts still start."""

    def __init__(self, out: Path, deadline_s: float, tiny: bool):
        self.out, self.start, self.deadline_s = out, time.perf_counter(), deadline_s
        self.data = {"tiny": tiny, "deadline_s": deadline_s, "published": PUBLISHED, "parts": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.start)

    def part(self, name: str, fn, min_left_s: float = 0.0):
        if self.left() < min_left_s:
            self.data["parts"][name] = {"skipped": f"{self.left():.0f}s left before the deadline, part needs "
                                                   f"~{min_left_s:.0f}s"}
            self.save()
            return None
        self.data["in_progress"] = name
        self.save()
        print(f"[{time.perf_counter() - self.start:6.1f}s] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            value = fn()
            self.data["parts"][name] = {**(value or {}), "part_s": time.perf_counter() - start}
        except Exception as e:  # noqa: BLE001 - every part degrades on its own
            value = None
            self.data["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        self.data.pop("in_progress", None)
        self.save()
        print(f"[{time.perf_counter() - self.start:6.1f}s] {name}: "
              f"{json.dumps(harness.to_jsonable(self.data['parts'][name]))[:400]}", flush=True)
        return value

    def save(self):
        self.data["elapsed_s"] = time.perf_counter() - self.start
        harness.write_json(self.out / "gpu_results.json", self.data)


def environment() -> dict:
    import jax

    info = {"versions": harness.versions(), "jax_devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind}
    try:
        import torch
        info["torch_cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
    except ImportError:
        info["torch_cuda"] = None
    return info


def settings(tiny: bool) -> dict:
    from cascade_jax.models.registry import load_config
    from cascade_jax.pipelines.loading import pipeline_set

    if tiny:
        sets = pipeline_set("tiny")
        return {"configs": {k: sets[k] for k in ("stage_c", "stage_b", "stage_a")}, "batch": 1, "size": 256,
                "steps": (3, 2), "train_steps": 2,
                "train": {"config": "tiny_c", "image_size": 64, "batches": [2, 1], "compute_dtype": "float32"}}
    # Training: the released Stage C finetune config at 768^2 (24x24x16 EfficientNet latents), batch 8 first.
    return {"configs": {k: load_config(k) for k in ("stage_c", "stage_b", "stage_a")}, "batch": 4, "size": 1024,
            "steps": (20, 10), "train_steps": 5,
            "train": {"config": "finetune_c_3b", "image_size": 768, "batches": [8, 6, 4, 2, 1],
                      "compute_dtype": "bfloat16"}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs, 256^2, few steps: a CPU smoke test")
    p.add_argument("--out", default=os.environ.get("OUT") or str(harness.RESULTS_DIR / "gpu_tiny"))
    p.add_argument("--deadline-s", type=float, default=400.0, help="no part starts after this many seconds")
    args = p.parse_args(argv)
    run = Run(Path(args.out), args.deadline_s, args.tiny)
    from benchmarks import gpu_cases as parts

    run.data["environment"] = run.part("environment", environment)
    cfg = settings(args.tiny)
    run.data["settings"] = {"batch": cfg["batch"], "size": cfg["size"], "steps": cfg["steps"], "dtype": "bfloat16",
                            "train": cfg["train"]}
    state = parts.GpuCascadeCases(cfg)
    run.part("build_jax_models", state.build_jax, min_left_s=60)
    run.part("jax_stage_c", state.jax_stage_c, min_left_s=60)
    run.part("torch_stage_c", state.torch_stage_c, min_left_s=30)
    run.part("jax_stage_b", state.jax_stage_b, min_left_s=60)
    run.part("torch_stage_b", state.torch_stage_b, min_left_s=30)
    run.part("jax_stage_a", state.jax_stage_a, min_left_s=20)
    run.part("torch_stage_a", state.torch_stage_a, min_left_s=15)
    run.data["summary"] = parts.summarize(run.data["parts"], cfg["batch"])
    run.save()
    state.release_inference()
    run.part("train_stage_c", lambda: state.train(run.left() - 60), min_left_s=90)
    if args.tiny:
        run.data["parts"]["jax_stage_c_cudnn_attention"] = {"skipped": "cuDNN attention needs an NVIDIA GPU"}
    else:
        run.part("jax_stage_c_cudnn_attention", state.jax_stage_c_cudnn_attention, min_left_s=60)
    run.data["summary"] = parts.summarize(run.data["parts"], cfg["batch"])
    run.save()
    (Path(args.out) / "gpu_summary.md").write_text(parts.markdown(run.data))
    print(parts.markdown(run.data), flush=True)


if __name__ == "__main__":
    main()
