"""Forward pass per stage: JAX (our NNX model, jitted) against diffusers' StableCascadeUNet.

Both hold the same random weights in the same memory (see ``bridge``): one process, so the
runs can alternate (A B, B A, ...) under the same machine load, and the 3.6B Stage C (14.4 GB
in float32) fits a 24 GB machine once instead of twice. Inputs are drawn once in numpy and
laid out NHWC for JAX and NCHW for PyTorch before timing. PyTorch runs with
``torch.set_num_threads(cores)`` under ``inference_mode``; JAX is compiled ahead of time and
its compile time is reported apart.
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import shared_weights
from benchmarks.harness import alternate, free_memory, log, other_cpu_load, ratio, rss_gb, skipped, summarize, timed
from cascade_jax.compile_report import xla_cost
from cascade_jax.models.registry import abstract_model

# 1024x1024 images: Stage C latent 24x24x16, Stage B latent 256x256x4.
STAGE_SHAPES = {"stage_c": (24, 24, 16), "stage_b": (256, 256, 4)}
TEXT_TOKENS = 77


def draw_inputs(model_name: str, config: dict, batch: int, shape: tuple, seed: int = 0) -> dict:
    """numpy NHWC inputs of one forward: latent, noise level and conditioning."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s, dtype=np.float32)
    inputs = {"x": normal(batch, *shape), "r": rng.uniform(0.1, 0.9, batch).astype(np.float32)}
    if model_name == "stage_c":
        inputs.update(clip_text=normal(batch, TEXT_TOKENS, config["c_clip_text"]),
                      clip_text_pooled=normal(batch, 1, config["c_clip_text_pooled"]),
                      clip_img=normal(batch, 1, config["c_clip_img"]))
    else:
        hc = math.ceil(shape[0] * 4 / 42.67)  # the Stage C latent of the same image
        inputs.update(effnet=normal(batch, hc, hc, config["c_effnet"]), clip=normal(batch, 1, config["c_clip"]))
    return inputs


def jax_args(model_name: str, inputs: dict, dtype) -> tuple:
    order = ("x", "r", "clip_text", "clip_text_pooled", "clip_img") if model_name == "stage_c" else \
        ("x", "r", "effnet", "clip")
    cast = lambda k, v: jnp.asarray(v, jnp.float32 if k == "r" else dtype)
    return tuple(cast(k, inputs[k]) for k in order)


def torch_call(model_name: str, unet, inputs: dict, dtype):
    """A zero-argument callable running diffusers' forward on NCHW copies of ``inputs``."""
    import torch

    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(dtype)
    seq = lambda a: torch.from_numpy(a).to(dtype)
    x, r = nchw(inputs["x"]), torch.from_numpy(inputs["r"]).to(dtype)
    if model_name == "stage_c":
        kwargs = dict(clip_text_pooled=seq(inputs["clip_text_pooled"]), clip_text=seq(inputs["clip_text"]),
                      clip_img=seq(inputs["clip_img"]))
    else:
        kwargs = dict(clip_text_pooled=seq(inputs["clip"]), effnet=nchw(inputs["effnet"]))

    def run():
        with torch.inference_mode():
            return unet(x, r, **kwargs).sample
    return run


def jax_forward(model: nnx.Module, args: tuple):
    """(compiled forward, state, compile seconds, flops) for ``model(*args)``."""
    graphdef, state = nnx.split(model)

    def forward(state, *args):
        return nnx.merge(graphdef, state)(*args)

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(state, *args).compile()
    return compiled, state, time.perf_counter() - start, xla_cost(compiled)["flops"]


def _depthwise_as_shifted_sum(original):
    """Conv2d.__call__ where a depthwise kxk conv (groups = channels, stride 1) is k*k shifted
    multiply-adds that XLA fuses into one loop, instead of XLA:CPU's slow grouped convolution."""

    def call(self, x):
        w = self.weight[...]
        k, c = w.shape[0], w.shape[-1]
        if not (self.groups > 1 and self.groups == c == x.shape[-1] and w.shape[2] == 1 and self.stride == 1):
            return original(self, x)
        p = self.padding
        xp = jnp.pad(x.astype(w.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
        oh, ow = xp.shape[1] - k + 1, xp.shape[2] - k + 1
        y = sum(xp[:, i:i + oh, j:j + ow, :] * w[i, j, 0] for i in range(k) for j in range(k))
        return y if self.bias is None else y + self.bias[...]
    return call


def depthwise_variant(model, args, rounds: int) -> dict:
    """The same forward with depthwise convs forced to shifted sums (the library's CPU path);
    JAX-only timings to set against the main alternation's PyTorch median."""
    from cascade_jax.nn.layers import Conv2d

    original = Conv2d.__call__
    Conv2d.__call__ = _depthwise_as_shifted_sum(original)
    try:
        compiled, state, compile_s, _ = jax_forward(model, args)
    finally:
        Conv2d.__call__ = original
    out = {}
    samples = [timed(lambda: out.__setitem__("y", compiled(state, *args).block_until_ready()))
               for _ in range(rounds)]
    return {"compile_s": compile_s, **summarize(samples), "output": out["y"]}


def memory_needed_gb(n_params: int, batch: int, shape: tuple, dtype_bytes: int = 4) -> float:
    """Weights once (shared by both frameworks) plus a generous activation allowance."""
    activations = 64 * batch * int(np.prod(shape)) * 1280 * dtype_bytes / 2**30 if shape[0] > 64 else 1.0
    return n_params * dtype_bytes / 2**30 + min(activations, 6.0) + 1.0


def run_case(label: str, model_name: str, config: dict, batch: int, shape: tuple, *, max_rounds: int = 5,
             case_budget_s: float = 120.0, warmup_below_s: float = 5.0, breakdown: bool = False,
             est_run_s: float | None = None, depthwise_rounds: int = 0) -> dict:
    """Build, compile and time one (configuration, batch) pair; returns the result record."""
    import psutil
    import torch

    result = {"label": label, "model": model_name, "batch": batch, "latent_shape_nhwc": [batch, *shape],
              "dtype": "float32", "torch_threads": torch.get_num_threads()}
    abstract = abstract_model(model_name, config)
    n_params = shared_weights.param_count(abstract)
    result["params"] = n_params
    need = memory_needed_gb(n_params, batch, shape)
    available = psutil.virtual_memory().available / 2**30
    if need > available:
        return {**result, **skipped(f"needs about {need:.1f} GiB (weights shared by both frameworks + activations), "
                                    f"{available:.1f} GiB available")}
    result["load_before"] = other_cpu_load()
    start = time.perf_counter()
    model = shared_weights.fast_random_model(model_name, config, seed=0)
    result["build_jax_s"] = time.perf_counter() - start
    start = time.perf_counter()
    unet = shared_weights.diffusers_unet(model_name, config, model, share=True)
    result["build_torch_s"] = time.perf_counter() - start
    inputs = draw_inputs(model_name, config, batch, shape)
    args = jax_args(model_name, inputs, jnp.float32)
    compiled, state, result["jax_compile_s"], result["flops"] = jax_forward(model, args)
    out = {}
    torch_run = torch_call(model_name, unet, inputs, torch.float32)
    runs = {"jax": lambda: out.__setitem__("jax", compiled(state, *args).block_until_ready()),
            "torch": lambda: out.__setitem__("torch", torch_run())}

    # Warm up (untimed) only where a run is cheap; expensive cases count their first run.
    first = {}
    warmup = 1 if (est_run_s is None or est_run_s < warmup_below_s) else 0
    if warmup:
        first = {name: timed(fn) for name, fn in runs.items()}
    probe = alternate(runs, 1)
    per_round = probe["jax"][0] + probe["torch"][0]
    spent = sum(first.values()) + per_round
    rounds = int(max(1, min(max_rounds, 1 + (case_budget_s - spent) // per_round)))
    more = alternate(runs, rounds - 1) if rounds > 1 else {"jax": [], "torch": []}
    samples = {k: probe[k] + more[k] for k in runs}
    result.update(warmup_rounds=warmup, untimed_first_s=first or None, rss_gb=rss_gb())
    result["jax"] = summarize(samples["jax"])
    result["torch"] = summarize(samples["torch"])
    result["ratio_jax_over_torch"] = ratio(result["jax"], result["torch"])
    ref = out["torch"].numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(out["jax"])
    result["max_rel_diff_vs_torch"] = float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))
    if result["flops"]:
        result["gflops_per_s"] = {k: result["flops"] / result[k]["median_s"] / 1e9 for k in ("jax", "torch")}
    if depthwise_rounds:
        try:
            variant = depthwise_variant(model, args, depthwise_rounds)
            same = float(np.max(np.abs(np.asarray(variant.pop("output")) - ours)) / max(np.max(np.abs(ours)), 1e-30))
            result["jax_depthwise_shifted_sum"] = {**variant, "max_rel_diff_vs_jax": same,
                                                   "ratio_over_torch": ratio(variant, result["torch"])}
        except Exception as e:  # noqa: BLE001 - the what-if must not lose the case
            result["jax_depthwise_shifted_sum"] = {"error": f"{type(e).__name__}: {e}"}
    if breakdown:
        from benchmarks.forward_breakdown import block_breakdown
        try:
            result["breakdown"] = block_breakdown(model_name, config, model, unet, batch, shape,
                                                  whole={k: result[k]["median_s"] for k in ("jax", "torch")})
        except Exception as e:  # noqa: BLE001 - a failed breakdown must not lose the case
            result["breakdown"] = {"error": f"{type(e).__name__}: {e}"}
    result["load_after"] = other_cpu_load()
    return result  # the caller frees the models (free_memory) once this frame is gone


def estimate_run_s(flops: float | None, gflops: float) -> float | None:
    return None if not flops else flops / (gflops * 1e9)


_COST_CACHE: dict = {}
# XLA:CPU compile seconds per line of the lowered StableHLO text: 2.5-3 ms measured on a busy 2-core
# machine for the tiny Stage B/C; updated from every compile this run measures.
COMPILE_S_PER_HLO_LINE = [0.003]


def abstract_flops(model_name: str, config: dict, batch: int, shape: tuple) -> float | None:
    """Forward flops from XLA's cost analysis of the lowered (not compiled) program: seconds, no memory."""
    return abstract_cost(model_name, config, batch, shape)[0]


def estimated_compile_s(model_name: str, config: dict, shape: tuple) -> float:
    return abstract_cost(model_name, config, 1, shape)[1] * COMPILE_S_PER_HLO_LINE[0]


def abstract_cost(model_name: str, config: dict, batch: int, shape: tuple) -> tuple:
    """(flops, lines of StableHLO) of the forward, cached."""
    key = (model_name, json.dumps(config, sort_keys=True), batch, tuple(shape))
    if key not in _COST_CACHE:
        _COST_CACHE[key] = _abstract_cost(model_name, config, batch, shape)
    return _COST_CACHE[key]


def _abstract_cost(model_name: str, config: dict, batch: int, shape: tuple) -> tuple:
    abstract = abstract_model(model_name, config)
    graphdef, state = nnx.split(abstract)
    inputs = draw_inputs(model_name, config, 1, shape)
    args = tuple(jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype) for a in jax_args(model_name, inputs, jnp.float32))
    lowered = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *args)
    return xla_cost(lowered)["flops"], lowered.as_text().count("\n")


def run_forward_section(cases: list[dict], budget, throughput_gflops: float, log_prefix="forward") -> list[dict]:
    """Run ``cases`` ({label, model, config, batch, shape, ...}) in order while the budget lasts."""
    results = []
    for case in cases:
        label = f"{case['label']} b{case['batch']}"
        if case.get("skip_reason"):
            results.append({"label": case["label"], "batch": case["batch"], **skipped(case["skip_reason"])})
            log(f"{log_prefix}: {label} skipped ({case['skip_reason']})")
            continue
        # Flops are linear in the batch: lower once at batch 1 (lowering a 3.6B model takes ~10 s here).
        flops_1 = abstract_flops(case["model"], case["config"], 1, case["shape"])
        flops = flops_1 * case["batch"] if flops_1 else None
        est_run = estimate_run_s(flops, throughput_gflops)
        # Build + compile(s) + at least one alternating round (each framework once), plus warmup if cheap.
        compile_est = estimated_compile_s(case["model"], case["config"], case["shape"])
        compiles = 2 if case.get("depthwise_rounds") else 1
        est_min = 10 + compiles * compile_est + (2 * est_run if est_run else 30) * (2 if (est_run or 0) < 5 else 1)
        if not budget.fits(est_min, reserve_s=case.get("reserve_s", 0)):
            reason = (f"estimated {est_min:.0f}s (forward {fmt(est_run)}s per framework at {throughput_gflops:.0f} "
                      f"GFLOP/s) exceeds the remaining budget ({budget.remaining() - case.get('reserve_s', 0):.0f}s); "
                      f"run with --full, or --only forward --budget SECONDS")
            results.append({"label": case["label"], "batch": case["batch"], "flops": flops, **skipped(reason)})
            log(f"{log_prefix}: {label} skipped: {reason}")
            continue
        case_budget = min(case.get("case_budget_s", 120.0), budget.remaining() - case.get("reserve_s", 0))
        if budget.dry_run:
            est_case = dry_run_case_s(est_min, est_run, case_budget, case.get("max_rounds", 5), case.get("breakdown"))
            est_case += case.get("depthwise_rounds", 0) * (est_run or 10)
            budget.consume(est_case)
            results.append({"label": case["label"], "batch": case["batch"], "flops": flops,
                            **skipped(f"dry run: would run, ~{est_case:.0f}s ({fmt(est_run)}s per forward)")})
            log(f"{log_prefix}: {label}: dry run, ~{est_case:.0f}s ({fmt(est_run)}s per forward per framework)")
            continue
        log(f"{log_prefix}: {label} (est. {fmt(est_run)}s per forward per framework)")
        try:
            record = run_case(case["label"], case["model"], case["config"], case["batch"], case["shape"],
                              case_budget_s=case_budget, breakdown=case.get("breakdown", False), est_run_s=est_run,
                              max_rounds=case.get("max_rounds", 5), depthwise_rounds=case.get("depthwise_rounds", 0))
        except Exception as e:  # noqa: BLE001 - one failed case is recorded, the others still run
            import traceback
            record = {"label": case["label"], "batch": case["batch"], "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=6)}
        free_memory()
        results.append(record)
        if record.get("jax_compile_s"):  # calibrate later compile estimates on this machine, now
            lines = abstract_cost(case["model"], case["config"], 1, case["shape"])[1]
            COMPILE_S_PER_HLO_LINE[0] = record["jax_compile_s"] / max(lines, 1)
        if "jax" in record:
            log(f"{log_prefix}: {label}: jax {record['jax']['median_s']:.3f}s torch {record['torch']['median_s']:.3f}s "
                f"ratio {record['ratio_jax_over_torch']:.2f} (n={record['jax']['n']}, compile "
                f"{record['jax_compile_s']:.1f}s, rel diff {record['max_rel_diff_vs_torch']:.1e})")
        else:
            log(f"{log_prefix}: {label}: {record.get('skipped') or record.get('error')}")
    return results


def dry_run_case_s(est_min: float, est_run, case_budget: float, max_rounds: int, breakdown) -> float:
    """What ``run_case`` would spend: the minimum, then more alternating rounds while they fit."""
    per_round = 2 * (est_run or 15)
    rounds = int(max(1, min(max_rounds, 1 + (case_budget - est_min) // per_round)))
    return (est_min + (rounds - 1) * per_round) * (1.15 if breakdown else 1.0)


def fmt(value) -> str:
    return "?" if value is None else f"{value:.1f}"
