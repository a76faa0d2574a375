"""The library's training step timed: ``cascade_jax.training`` (``build_run``, ``jit_train_step``,
the latent cache) on configs of ``configs/training/`` with random weights.

A variant is a training config (``tiny_c``, ``tiny_b``, ``finetune_c_1b``, ``finetune_b_700m``) with
overrides: batch, image size, ``remat`` none or full, and ``cached_conditions`` (the frozen
encoders ran once, the step trains from their outputs). Each variant runs in its own
process so its peak memory (VmHWM) is its own; the parent watches the child's RSS and stops it
before the shared machine runs out of memory, recording where it stopped.

Inside a child: ``build_run`` builds the run as training does (the generator's random weights
come from a pooled generator, ``shared_weights.fast_random_model``, seconds instead of minutes for a
billion parameters; the frozen encoders are the config's ``encoders`` set, random). One loader
batch (random images, captions) goes through the task's ``host_batch`` once — for a cached
variant ``latent_cache.write_cache`` encodes it first (or, for the lite models whose real-size
encoders do not fit beside the optimizer state, random arrays of the cache's shapes are written)
and ``CachedBatches`` reads it back — then the step is compiled with ``jit_train_step`` and the
run's shardings, exactly what ``Run.step`` does, and repeated on that batch. Step time is the
device step (host preprocessing is timed separately, once).

Flops: model flops are XLA's cost analysis of the *lowered* step without remat (the frozen
encoders' forward included when they run in the step); the compiled step's own count is
hardware flops (remat recomputes the forward). MFU = model flops / step time / nominal peak.

    python benchmarks/run_cpu.py --only train               # through the benchmark set
    python benchmarks/bench_train.py --child '{"config": "tiny_c", "batch": 4, ...}'
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import BENCH_DIR, log, other_cpu_load, skipped  # noqa: E402

GIB = 2 ** 30


# ---- the library run (used by the CPU children and the GPU script) -----------------------------

def variant_config(name: str, *, batch: int, image_size: int, remat: str, cached: bool, extra=()):
    """The training config ``name`` with the benchmark's overrides (random weights, no checkpoints read)."""
    from cascade_jax.training import load_config

    overrides = [f"batch_size={batch}", f"image_size={image_size}", f"remat={'null' if remat == 'none' else remat}",
                 f"cached_conditions={'true' if cached else 'false'}", "init=scratch", "grad_accum_steps=1",
                 "generator_checkpoint_path=null", *extra]  # init: scratch refuses a checkpoint path beside it
    return load_config(name, overrides)


def bench_task(stage: str):
    """The registered task of ``stage`` whose generator gets pooled random weights (same value rules as
    ``init: scratch``, a cheaper generator: a 3.6B model in seconds)."""
    from cascade_jax.training import get_task

    base = type(get_task(stage))

    class BenchTask(base):
        def build_generator(self, cfg, work_dir):
            from benchmarks import shared_weights

            config = self.generator_config(cfg)
            model = shared_weights.fast_random_model(self.generator_model, config, seed=cfg.seed, dtype=cfg.param_dtype)
            if cfg.remat:
                model.set_remat(cfg.remat)
            if cfg.dropout:
                model.train()
            return model

    BenchTask.__name__ = f"Bench{base.__name__}"
    return BenchTask()


def one_device_mesh():
    """The run's mesh on the first device only: a one-chip measurement even where more devices are visible
    (the test suite's 8 simulated CPU devices)."""
    import jax

    from cascade_jax.sharding import make_mesh

    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def loader_batch(cfg, seed: int = 0) -> dict:
    """One loader batch as the data pipeline yields it: uint8 images and captions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s = cfg.batch_size, cfg.image_size
    return {"images": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
            "captions": [f"a photograph of a lighthouse number {i} at sunset" for i in range(b)]}


def write_random_cache(cfg, out_dir) -> Path:
    """One cached batch of the shapes ``write_cache`` writes, random values (no encoders run)."""
    import numpy as np

    from cascade_jax.training import get_task

    specs = get_task(cfg.stage).plan_batch(cfg)
    rng = np.random.default_rng(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "00000000.npz", **{k: rng.standard_normal(shape, dtype=np.float32)
                                      for k, (shape, _) in specs.items()})
    return out


def lower_step(run, batch, graphdef=None):
    """The step ``Run.step`` compiles (``jit_train_step`` with the run's shardings), lowered."""
    from cascade_jax.training import placement
    from cascade_jax.training.step import jit_train_step

    step = jit_train_step(run.task, run.cfg, run.graphdef if graphdef is None else graphdef, run.tx,
                          run.state_shardings, run.frozen_shardings, placement.batch_shardings(batch, run.mesh),
                          placement.replicated(run.mesh))
    return step.lower(run.state, run.frozen, batch)


def flops_of(lowered_or_compiled) -> float | None:
    from cascade_jax.compile_report import xla_cost

    return xla_cost(lowered_or_compiled)["flops"]


def model_flops(run, batch, lowered) -> float | None:
    """Flops of the step without remat: the lowered step itself, or the same step with remat switched off."""
    if not run.cfg.remat:
        return flops_of(lowered)
    from flax import nnx

    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)  # views of the same arrays
    modules.generator.set_remat(None)
    graphdef = nnx.split(modules, run.task.trainable(run.cfg), ...)[0]
    return flops_of(lower_step(run, batch, graphdef))


def xla_memory_gb(compiled) -> dict | str:
    from cascade_jax.compile_report import xla_memory

    return xla_memory(compiled) or "unavailable on this backend"


def time_steps(run, compiled, batch, steps: int, deadline: float) -> tuple[list, list]:
    """Seconds of ``steps`` updates after one untimed warm-up update, and every loss; stops at ``deadline``."""
    times, losses = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        run.state, metrics = compiled(run.state, run.frozen, batch)
        losses.append(float(metrics["loss"]))  # blocks until the update is done
        elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
        if i and time.perf_counter() + elapsed > deadline:
            break
    return times, losses


def param_counts(run) -> dict:
    import jax
    import numpy as np

    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"trainable_params": count(run.state.params), "frozen_params": count(run.frozen)}


def prepare_batch(cfg, work_dir: Path, random_cache: bool) -> tuple[dict, dict]:
    """(a loader batch for the run of ``cfg``, what making it cost): for a cached config the batch comes
    from a latent cache written here, through ``CachedBatches``."""
    import dataclasses

    from cascade_jax.training.latent_cache import CachedBatches, write_cache

    if not cfg.cached_conditions:
        return loader_batch(cfg), {}
    start = time.perf_counter()
    if random_cache:
        cache = write_random_cache(cfg, work_dir / "cache")
        info = {"cache": "random arrays of the cached shapes (the real-size encoders were not run)"}
    else:
        encoding = dataclasses.replace(cfg, cached_conditions=False, remat=None)
        cache = write_cache(encoding, iter([loader_batch(cfg)]), work_dir / "cache", 1)
        info = {"cache": "write_cache: the config's frozen encoders on one loader batch"}
    info["cache_write_s"] = time.perf_counter() - start
    return next(CachedBatches(cache)), info


# ---- one CPU variant (child process) -------------------------------------------------------------

def rss_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2 ** 20


def child(spec: dict) -> dict:
    from cascade_jax.data import global_batch
    from cascade_jax.training import build_run
    from cascade_jax.training.loop import host_rng

    cfg = variant_config(spec["config"], batch=spec["batch"], image_size=spec["image_size"], remat=spec["remat"],
                         cached=spec["cached"], extra=spec.get("overrides", ()))
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        raw, info = prepare_batch(cfg, Path(tmp), spec.get("random_cache", False))
        out.update(info)
        start = time.perf_counter()
        run = build_run(cfg, task=bench_task(cfg.stage), mesh=one_device_mesh())
        out.update(build_s=time.perf_counter() - start, rss_after_build_gb=rss_gb("VmRSS"), **param_counts(run))
    start = time.perf_counter()
    arrays = run.task.host_batch(cfg, raw, host_rng(cfg, 0))
    batch = global_batch(arrays, run.mesh)
    out["host_batch_s"] = time.perf_counter() - start
    out["batch_shapes"] = {k: list(v.shape) for k, v in arrays.items()}
    start = time.perf_counter()
    lowered = lower_step(run, batch)
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - start
    out["hardware_flops_per_step"] = flops_of(compiled)
    start = time.perf_counter()
    out["model_flops_per_step"] = model_flops(run, batch, lowered)
    out["model_flops_lowering_s"] = time.perf_counter() - start
    out["xla_memory_gb"] = xla_memory_gb(compiled)
    times, losses = time_steps(run, compiled, batch, spec["steps"], time.perf_counter() + spec["time_limit_s"])
    return {**out, "step_s": times, "losses": losses, "peak_rss_gb": rss_gb("VmHWM")}


# ---- the CPU section (parent) --------------------------------------------------------------------

def run_variant(spec: dict, timeout_s: float, memory_cap_gb: float) -> dict:
    """The child's result; it is stopped past ``timeout_s``, above ``memory_cap_gb`` of RSS, or when the
    machine has less than 0.75 GiB available."""
    import psutil

    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, peak, stopped = time.perf_counter(), 0.0, None
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            pass
        try:
            rss = psutil.Process(proc.pid).memory_info().rss / GIB
        except psutil.NoSuchProcess:
            continue
        peak, available = max(peak, rss), psutil.virtual_memory().available / GIB
        if time.perf_counter() - start > timeout_s:
            stopped = f"timed out after {timeout_s:.0f}s"
        elif rss > memory_cap_gb or available < 0.75:
            stopped = (f"stopped at {rss:.1f} GiB RSS (cap {memory_cap_gb:.1f} GiB, machine "
                       f"{available:.1f} GiB available) before the machine ran out of memory")
        if stopped:
            proc.kill()
            stdout, stderr = proc.communicate()
            return {"error": stopped, "peak_rss_seen_gb": peak, "stderr_tail": stderr[-600:]}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {stderr[-1500:]}", "peak_rss_seen_gb": peak}
    return json.loads(stdout.strip().splitlines()[-1])


def memory_need_gb(spec: dict) -> float:
    """float32 params + grads + AdamW moments (16 bytes per trainable parameter), frozen models in float32,
    and 1 GiB for the process; activations not counted."""
    return (16 * spec["trainable_params"] + 4 * spec["frozen_params"]) / GIB + 1.0


def estimate_s(spec: dict) -> float:
    return spec["est_build_s"] + spec["est_compile_s"] + spec["est_step_s"] * (spec["steps"] + 1)


def _skip_reason(spec: dict, budget) -> str | None:
    import psutil

    need, available = memory_need_gb(spec), psutil.virtual_memory().available / GIB
    if need > available - 1.0:
        return (f"needs ~{need:.1f} GiB ({spec['trainable_params'] / 1e9:.2f}B trainable params x 16 bytes of "
                f"float32 AdamW state, {spec['frozen_params'] / 1e9:.2f}B frozen x 4, activations not counted); "
                f"the machine has {available:.1f} GiB available")
    if not budget.fits(estimate_s(spec)):
        return f"estimated {estimate_s(spec):.0f}s exceeds the remaining budget {budget.remaining():.0f}s"
    return None


RECORD_KEYS = ("label", "stage", "config", "batch", "image_size", "latent", "remat", "cached", "steps")


def run_train_section(budget, variants: list[dict], peak: dict, measured_gflops: float | None) -> list[dict]:
    """``variants``: the child spec plus label, stage, latent, trainable/frozen params and estimates;
    ``skip_reason`` records a variant without running it."""
    import psutil

    results = []
    for spec in variants:
        record = {k: spec[k] for k in RECORD_KEYS if k in spec}
        name = f"{spec['label']} remat={spec['remat']}{' cached' if spec.get('cached') else ''}"
        reason = spec.get("skip_reason") or _skip_reason(spec, budget)
        if not reason and budget.dry_run:
            budget.consume(estimate_s(spec))
            reason = f"dry run: would run, ~{estimate_s(spec):.0f}s"
        if reason:
            results.append({**record, **skipped(reason)})
            log(f"train: {name}: skipped ({reason})")
            continue
        log(f"train: {name}, batch {spec['batch']} at {spec['image_size']}^2 (~{estimate_s(spec):.0f}s)")
        record["load_before"] = other_cpu_load()
        child_spec = {k: spec[k] for k in ("config", "batch", "image_size", "remat", "cached", "steps",
                                           "random_cache", "overrides") if k in spec}
        child_spec["time_limit_s"] = max(10.0, min(spec["est_step_s"] * (spec["steps"] + 1) * 2,
                                                   budget.remaining() - spec["est_compile_s"] - 30))
        cap = psutil.virtual_memory().available / GIB - 1.0
        record.update(run_variant(child_spec, timeout_s=max(90.0, budget.remaining()), memory_cap_gb=cap))
        record["load_after"] = other_cpu_load()
        if record.get("step_s"):
            add_rates(record, spec["batch"], peak, measured_gflops)
            log(f"train: {name}: {record['median_step_s']:.3f} s/step, {record['images_per_s']:.2f} img/s, "
                f"MFU {100 * record.get('mfu_vs_nominal_peak', 0):.1f}%, peak RSS {record['peak_rss_gb']:.2f} GiB, "
                f"compile {record['compile_s']:.0f}s")
        else:
            log(f"train: {name}: {record.get('error')}")
        results.append(record)
    return results


def add_rates(record: dict, batch: int, peak: dict, measured_gflops):
    step_s = statistics.median(record["step_s"])
    record.update(median_step_s=step_s, steps_per_s=1 / step_s, images_per_s=batch / step_s)
    flops = record.get("model_flops_per_step")
    if not flops:
        return
    record["achieved_gflops"] = flops / step_s / 1e9
    if peak.get("gflops"):
        record["mfu_vs_nominal_peak"] = record["achieved_gflops"] / peak["gflops"]
        if record.get("hardware_flops_per_step"):
            record["hfu_vs_nominal_peak"] = record["hardware_flops_per_step"] / step_s / 1e9 / peak["gflops"]
    if measured_gflops:
        record["mfu_vs_measured_matmul"] = record["achieved_gflops"] / measured_gflops


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        raise SystemExit(__doc__)
