"""A minimal jitted Stage C training step (there is no training code in the library yet):
optax AdamW, MSE against the GDF epsilon target of ``GDF().diffuse`` (noise level and noise
drawn inside the step), float32. Each variant runs in its own process so its peak memory
(VmHWM) is its own.

Rematerialisation variants:
* ``none``   - plain backward;
* ``whole``  - ``jax.checkpoint`` around the whole forward (recompute everything in backward);
* ``blocks`` - the model's own per-block remat option (``StageC.set_remat("full")``).

Model flops come from XLA's cost analysis of the compiled step without remat (the remat
variants recompute, so their own count is hardware flops, reported as ``hfu``).

    python benchmarks/bench_train.py --child '{"label": ..., "config": {...}, ...}'
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from common import BENCH_DIR, log, other_cpu_load, skipped

SMALL_STAGE_C = {  # ~50M parameters: big enough that the step is compute, not dispatch
    "c_in": 16, "c_out": 16, "c_r": 64, "patch_size": 1, "c_cond": 512, "c_hidden": [512, 512], "nhead": [8, 8],
    "blocks": [[2, 4], [4, 2]], "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"],
    "c_clip_text": 1280, "c_clip_text_pooled": 1280, "c_clip_img": 768, "c_clip_seq": 4, "kernel_size": 3,
    "dropout": [0.0, 0.0], "self_attn": True, "t_conds": ["sca", "crp"], "switch_level": [False]}


def _optimizer(lr: float = 1e-4):
    import optax
    return optax.adamw(lr, weight_decay=0.01)


def init_state(model, batch: int, shape: tuple, config: dict):
    """(graphdef, params, AdamW state, one random batch of latents and conditioning)."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(model)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    data = {"x0": jax.random.normal(k1, (batch, *shape)),
            "clip_text": jax.random.normal(k2, (batch, 77, config["c_clip_text"])),
            "clip_text_pooled": jax.random.normal(k3, (batch, 1, config["c_clip_text_pooled"])),
            "clip_img": jax.random.normal(k4, (batch, 1, config["c_clip_img"]))}
    return graphdef, params, _optimizer().init(params), data


def make_step(graphdef, remat: str):
    """A freshly traced jitted step (params and optimizer state donated); per-block remat is
    already part of ``graphdef`` when the model was built with it."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cascade_jax.diffusion import GDF

    tx, gdf = _optimizer(), GDF()

    def forward(params, noised, r, clip_text, pooled, img):
        return nnx.merge(graphdef, params)(noised, r, clip_text, pooled, img)

    if remat == "whole":
        forward = jax.checkpoint(forward)

    def loss_fn(params, data, key):
        d = gdf.diffuse(data["x0"], key=key)
        pred = forward(params, d.noised, d.noise_cond, data["clip_text"], data["clip_text_pooled"], data["clip_img"])
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - d.target))

    def step(params, opt_state, data, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, data, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def child(spec: dict) -> dict:
    import bridge
    import jax
    from bench_forward import compiled_flops

    model = bridge.fast_random_model("stage_c", spec["config"], seed=0)
    if spec["remat"] == "blocks":
        model.set_remat("full")
    n_params = bridge.param_count(model)
    graphdef, params, opt_state, data = init_state(model, spec["batch"], tuple(spec["shape"]), spec["config"])
    step = make_step(graphdef, spec["remat"])
    del model
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, data, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    out = {"params": n_params, "compile_s": compile_s, "step_flops": compiled_flops(compiled)}
    try:
        mem = compiled.memory_analysis()
        out["xla_memory_gb"] = {k: getattr(mem, f"{k}_size_in_bytes") / 2**30
                                for k in ("argument", "output", "temp", "generated_code")}
    except Exception as e:  # noqa: BLE001 - optional on some backends
        out["xla_memory_gb"] = f"unavailable: {type(e).__name__}"
    times, losses = [], []
    deadline = time.perf_counter() + spec["time_limit_s"]
    for i in range(spec["steps"] + 1):  # the first step is a warm-up
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, data, jax.random.key(2 + i))
        loss = float(loss)
        elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
        losses.append(loss)
        if i and time.perf_counter() + elapsed > deadline:
            break
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return {**out, "step_s": times, "losses": losses, "peak_rss_gb": hwm / 2**20}


def run_variant(spec: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_estimate_gb(n_params: int) -> float:
    """fp32 params + grads + AdamW mu/nu (16 bytes/param), + 1 GiB for the process."""
    return 16 * n_params / 2**30 + 1.0


def run_train_section(budget, variants: list[dict], peak: dict, measured_gflops: float | None) -> list[dict]:
    """``variants``: {label, config, batch, shape, remat, steps, n_params, est_step_s?, skip_reason?}."""
    results, no_remat_flops = [], {}
    for spec in variants:
        record = {k: spec[k] for k in ("label", "batch", "shape", "remat")}
        reason = spec.get("skip_reason") or _skip_reason(spec, budget)
        if not reason and budget.dry_run:
            budget.consume(_estimate_s(spec))
            reason = f"dry run: would run, ~{_estimate_s(spec):.0f}s"
        if reason:
            record.update(skipped(reason))
            log(f"train: {spec['label']} remat={spec['remat']}: skipped ({reason})")
        else:
            log(f"train: {spec['label']} remat={spec['remat']} batch {spec['batch']}")
            record["load_before"] = other_cpu_load()
            child_spec = {k: v for k, v in spec.items() if k != "skip_reason"}
            child_spec["time_limit_s"] = max(10.0, min(_estimate_s(spec) * 2, budget.remaining() - 30))
            record.update(run_variant(child_spec, timeout_s=max(60.0, budget.remaining())))
            if record.get("step_s"):
                if spec["remat"] == "none":
                    no_remat_flops[spec["label"]] = record["step_flops"]
                _add_rates(record, spec, no_remat_flops.get(spec["label"]), peak, measured_gflops)
                log(f"train: {spec['label']} remat={spec['remat']}: {record['median_step_s']:.3f}s/step, "
                    f"{record['images_per_s']:.2f} img/s, peak RSS {record['peak_rss_gb']:.2f} GiB")
            else:
                log(f"train: {spec['label']} remat={spec['remat']}: {record.get('error')}")
            record["load_after"] = other_cpu_load()
        results.append(record)
    return results


def _estimate_s(spec: dict) -> float:
    return 40 + spec.get("est_step_s", 1.0) * (spec["steps"] + 1) * (1.4 if spec["remat"] != "none" else 1.0)


def _skip_reason(spec: dict, budget) -> str | None:
    import psutil

    need = memory_estimate_gb(spec["n_params"])
    available = psutil.virtual_memory().available / 2**30
    if need > available:
        return (f"params + grads + AdamW state alone need {need:.1f} GiB ({spec['n_params'] / 1e9:.2f}B params x "
                f"16 bytes, activations not counted), {available:.1f} GiB available")
    if not budget.fits(_estimate_s(spec)):
        return f"estimated {_estimate_s(spec):.0f}s exceeds the remaining budget {budget.remaining():.0f}s"
    return None


def _add_rates(record: dict, spec: dict, no_remat_flops, peak: dict, measured_gflops):
    step_s = statistics.median(record["step_s"])
    record["median_step_s"] = step_s
    record["images_per_s"] = spec["batch"] / step_s
    model_flops = no_remat_flops or record["step_flops"]
    if not model_flops:
        return
    record["model_flops_per_step"] = model_flops
    record["achieved_gflops"] = model_flops / step_s / 1e9
    if peak.get("gflops"):
        record["mfu_vs_nominal_peak"] = record["achieved_gflops"] / peak["gflops"]
        if record["step_flops"] and spec["remat"] != "none":
            record["hfu_vs_nominal_peak"] = record["step_flops"] / step_s / 1e9 / peak["gflops"]
    if measured_gflops:
        record["mfu_vs_measured_matmul"] = record["achieved_gflops"] / measured_gflops


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH_DIR))
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        raise SystemExit(__doc__)
