"""The parts of ``gpu_bench.py``: JAX and diffusers sampling per stage, Stage A decode, and the
Stage C training step. The diffusers UNets hold the JAX weights through DLPack (no second copy)."""

from __future__ import annotations

import gc
import math
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import shared_weights



PUBLISHED = {"batch": 4, "stage_c_s": 6.08, "stage_a_b_s": 4.07, "total_s": 10.15,
             "source": "figure quoted in issue 5 (diffusers, batch 4, 1024^2, 20+10 steps)"}


def sync_time(fn, device) -> tuple[object, float]:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _time_twice(fn, device):
    """(last output, [first-run seconds, steady seconds]) of two synchronised runs."""
    times = []
    for _ in range(2):
        out, seconds = sync_time(fn, device)
        times.append(seconds)
    return out, times

class GpuCascadeCases:
    """The GPU benchmark's parts over one set of models: JAX and PyTorch sampling per stage, then the training step."""

    def __init__(self, cfg: dict):
        self.cfg, self.models, self.outputs = cfg, {}, {}
        self.batch, self.size = cfg["batch"], cfg["size"]
        self.hc = math.ceil(self.size / 42.67)
        self.seeds = list(range(self.batch))
        self.torch_models, self.runners = {}, {}

    # ---- JAX ---------------------------------------------------------------------------------
    def build_jax(self) -> dict:
        out = {}
        for name, (model_name, config) in self.cfg["configs"].items():
            start = time.perf_counter()
            self.models[name] = shared_weights.fast_random_model(model_name, config, seed=0, dtype="bfloat16")
            jax.block_until_ready(nnx.state(self.models[name]))
            out[name] = {"params": shared_weights.param_count(self.models[name]), "build_s": time.perf_counter() - start}
        return out

    def _conditions(self, config: dict, seed: int):
        keys = jax.random.split(jax.random.key(seed), 4)
        b = self.batch
        cond = {"clip_text": jax.random.normal(keys[0], (b, 77, config["c_clip_text"])),
                "clip_text_pooled": jax.random.normal(keys[1], (b, 1, config["c_clip_text_pooled"])),
                "clip_img": jax.random.normal(keys[2], (b, 1, config["c_clip_img"]))}
        uncond = {"clip_text": jax.random.normal(keys[3], cond["clip_text"].shape),
                  "clip_text_pooled": jax.random.normal(keys[3], cond["clip_text_pooled"].shape),
                  "clip_img": jnp.zeros_like(cond["clip_img"])}
        return cond, uncond

    def _sample(self, name: str, settings, x_shape, cond, uncond) -> dict:
        from cascade_jax.pipelines.stage_runner import StageRunner, StageTiming

        runner = self.runners.setdefault(name, StageRunner(name, self.models[name]))
        timings = []
        for _ in range(2):
            timing = StageTiming()
            x0 = runner(settings, x_shape, self.seeds, cond, uncond, None, timing)
            timings.append(timing)
        self.outputs[name] = x0
        return {"compile_s": timings[0].compile_s, "first_run_s": timings[0].sample_s,
                "steady_s": timings[1].sample_s, "steps": settings.steps, "cfg": settings.cfg}

    def jax_stage_c(self) -> dict:
        from cascade_jax.pipelines.cascade import PRIOR_DEFAULTS

        settings = PRIOR_DEFAULTS.replace(steps=self.cfg["steps"][0])
        cond, uncond = self._conditions(self.cfg["configs"]["stage_c"][1], 0)
        self.pooled = (cond["clip_text_pooled"], uncond["clip_text_pooled"])
        return self._sample("stage_c", settings, (self.hc, self.hc, 16), cond, uncond)

    def jax_stage_b(self) -> dict:
        from cascade_jax.pipelines.cascade import DECODER_DEFAULTS

        settings = DECODER_DEFAULTS.replace(steps=self.cfg["steps"][1])
        effnet = self.outputs.get("stage_c")
        if effnet is None:
            effnet = jax.random.normal(jax.random.key(5), (self.batch, self.hc, self.hc, 16))
        pooled = getattr(self, "pooled", None) or (jax.random.normal(jax.random.key(6), (self.batch, 1, 1280)),) * 2
        cond = {"effnet": effnet, "clip": pooled[0]}
        uncond = {"effnet": jnp.zeros_like(effnet), "clip": pooled[1]}
        return self._sample("stage_b", settings, (self.size // 4, self.size // 4, 4), cond, uncond)

    def jax_stage_a(self) -> dict:
        graphdef, state = nnx.split(self.models["stage_a"])
        latents = self.outputs.get("stage_b")
        if latents is None:
            latents = jax.random.normal(jax.random.key(7), (self.batch, self.size // 4, self.size // 4, 4))
        decode = jax.jit(lambda s, z: jnp.clip(nnx.merge(graphdef, s).decode(z.astype(jnp.bfloat16)), 0, 1))
        start = time.perf_counter()
        compiled = decode.lower(state, latents).compile()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, latents))
            times.append(time.perf_counter() - start)
        return {"compile_s": compile_s, "first_run_s": times[0], "steady_s": times[1]}

    # ---- PyTorch (diffusers modules, same weights) ---------------------------------------------
    def _torch(self):
        import torch
        return torch, torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _torch_unet(self, name: str):
        if name not in self.torch_models:
            _, device = self._torch()
            model_name, config = self.cfg["configs"][name]
            self.torch_models[name] = shared_weights.diffusers_unet(model_name, config, self.models[name], share=True,
                                                            device=device)
        return self.torch_models[name]

    def torch_stage_c(self) -> dict:
        from benchmarks import torch_loop
        torch, device = self._torch()
        start = time.perf_counter()
        unet = self._torch_unet("stage_c")
        build_s = time.perf_counter() - start
        cond, uncond = torch_loop.prior_conditions(self.batch, self.cfg["configs"]["stage_c"][1], torch.bfloat16, device)
        latents = torch.randn(self.batch, 16, self.hc, self.hc, generator=torch.Generator().manual_seed(0))
        latents = latents.to(device=device, dtype=torch.bfloat16)
        steps = self.cfg["steps"][0]
        out, times = _time_twice(lambda: torch_loop.denoise(unet, latents, steps, 4.0, cond, uncond), device)
        self.outputs["torch_stage_c"] = out
        return {"build_s": build_s, "first_run_s": times[0], "steady_s": times[1], "steps": steps, "cfg": 4.0}

    def torch_stage_b(self) -> dict:
        from benchmarks import torch_loop
        torch, device = self._torch()
        start = time.perf_counter()
        unet = self._torch_unet("stage_b")
        build_s = time.perf_counter() - start
        effnet = self.outputs.get("torch_stage_c")
        if effnet is None:
            effnet = torch.randn(self.batch, 16, self.hc, self.hc).to(device=device, dtype=torch.bfloat16)
        cond, uncond = torch_loop.decoder_conditions(effnet, self.cfg["configs"]["stage_b"][1])
        latents = torch.randn(self.batch, 4, self.size // 4, self.size // 4, generator=torch.Generator().manual_seed(1))
        latents = latents.to(device=device, dtype=torch.bfloat16)
        steps = self.cfg["steps"][1]
        out, times = _time_twice(lambda: torch_loop.denoise(unet, latents, steps, 1.1, cond, uncond), device)
        self.outputs["torch_stage_b"] = out
        return {"build_s": build_s, "first_run_s": times[0], "steady_s": times[1], "steps": steps, "cfg": 1.1}

    def torch_stage_a(self) -> dict:
        from benchmarks import torch_loop
        torch, device = self._torch()
        config = self.cfg["configs"]["stage_a"][1]
        vq = shared_weights.diffusers_stage_a(config, self.models["stage_a"], share=True, device=device)
        latents = self.outputs.get("torch_stage_b")
        if latents is None:
            latents = torch.randn(self.batch, 4, self.size // 4, self.size // 4).to(device=device, dtype=torch.bfloat16)
        scale = config.get("scale_factor", 0.43)
        times = []
        for _ in range(2):
            _, seconds = sync_time(lambda: torch_loop.decode(vq, latents, scale), device)
            times.append(seconds)
        return {"first_run_s": times[0], "steady_s": times[1]}

    def jax_stage_c_cudnn_attention(self) -> dict:
        """Stage C again with ``jax.nn.dot_product_attention(implementation="cudnn")``: the library
        passes no implementation, which JAX resolves to XLA's attention on every backend."""
        import functools

        if "stage_c" not in self.models:  # the training step consumed (donated) the weights
            model_name, config = self.cfg["configs"]["stage_c"]
            self.models["stage_c"] = shared_weights.fast_random_model(model_name, config, seed=0, dtype="bfloat16")
        original = jax.nn.dot_product_attention
        jax.nn.dot_product_attention = functools.partial(original, implementation="cudnn")
        jax.clear_caches()  # the sampling loop must be traced again with the patched attention
        try:
            self.runners.pop("stage_c", None)
            return self.jax_stage_c()
        finally:
            jax.nn.dot_product_attention = original
            jax.clear_caches()

    def release_inference(self):
        """Free everything but the Stage C weights before training."""
        self.torch_models.clear()
        self.runners.clear()
        self.outputs.clear()
        for name in ("stage_b", "stage_a"):
            self.models.pop(name, None)
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        jax.clear_caches()

    # ---- training --------------------------------------------------------------------------
    def train(self, seconds_left: float) -> dict:
        """The library's Stage C step (``build_run`` + ``jit_train_step``, as ``bench_train.py`` on the CPU):
        float32 master weights and AdamW moments, bfloat16 compute, per-block remat, cached conditions
        (random arrays of the cache's shapes: the generator's step alone), at the largest batch of
        ``train_batches`` that runs; then, time permitting, the same batch without remat."""
        from benchmarks import bench_train as bt
        from cascade_jax.training import build_run
        from cascade_jax.training.metrics_log import peak_flops_per_device

        self.models.pop("stage_c", None)  # the inference copy; the cuDNN part rebuilds it
        gc.collect()
        deadline = time.perf_counter() + seconds_left - 20
        tc = self.cfg["train"]
        peak = peak_flops_per_device()
        out = {"config": tc["config"], "image_size": tc["image_size"], "param_dtype": "float32",
               "compute_dtype": tc["compute_dtype"], "remat": "full", "cached_conditions": True,
               "peak_tflops": peak / 1e12 if peak else None, "attempts": []}
        run = None
        for batch in tc["batches"]:
            if time.perf_counter() > deadline - 60:
                out["attempts"].append({"batch": batch, "skipped": "not enough time left before the deadline"})
                break
            cfg = bt.variant_config(tc["config"], batch=batch, image_size=tc["image_size"], remat="full", cached=True,
                                    extra=[f"compute_dtype={tc['compute_dtype']}"])
            try:
                if run is None or _deleted(run.state):  # a failed step may have consumed the donated state
                    start = time.perf_counter()
                    run = None
                    gc.collect()
                    run = build_run(cfg, task=bt.bench_task("c"), mesh=bt.one_device_mesh())
                    out.update(build_s=time.perf_counter() - start, **bt.param_counts(run))
                result = self._train_attempt(bt, run, cfg, deadline, peak)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the next batch is smaller
                result = {"batch": batch, "error": f"{type(e).__name__}: {str(e)[:600]}"}
            out["attempts"].append({"batch": batch, "ran": True} if "median_step_s" in result else result)
            if "median_step_s" in result:
                out["remat_full"] = result
                break
        if "remat_full" in out and time.perf_counter() < deadline - 90:
            try:
                out["remat_none"] = self._train_attempt(bt, run, run.cfg, deadline, peak, remat_off=True,
                                                        flops=out["remat_full"].get("model_flops_per_step"))
            except Exception as e:  # noqa: BLE001 - without remat the batch may not fit
                out["remat_none"] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
        elif "remat_full" in out:
            out["remat_none"] = {"skipped": "not enough time left before the deadline"}
        return out

    def _train_attempt(self, bt, run, cfg, deadline, peak, remat_off=False, flops=None) -> dict:
        import tempfile

        from cascade_jax.data import global_batch
        from cascade_jax.training.latent_cache import CachedBatches
        from cascade_jax.training.loop import host_rng

        with tempfile.TemporaryDirectory(prefix="gpu_train_") as tmp:
            raw = next(CachedBatches(bt.write_random_cache(cfg, tmp)))
        batch = global_batch(run.task.host_batch(cfg, raw, host_rng(cfg, 0)), run.mesh)
        graphdef = None
        if remat_off:
            modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
            modules.generator.set_remat(None)
            graphdef = nnx.split(modules, run.task.trainable(cfg), ...)[0]
        start = time.perf_counter()
        lowered = bt.lower_step(run, batch, graphdef)
        compiled = lowered.compile()
        result = {"batch": cfg.batch_size, "latent": list(batch["x0"].shape[1:]), "remat": "none" if remat_off else "full",
                  "compile_s": time.perf_counter() - start, "xla_memory_gb": bt.xla_memory_gb(compiled),
                  "hardware_flops_per_step": bt.flops_of(compiled)}
        if isinstance(result["xla_memory_gb"], dict):  # compile_report's peak: arguments + outputs + temps - aliases
            result["xla_step_memory_gb"] = result["xla_memory_gb"]["peak"]
        result["step_s"], result["losses"] = bt.time_steps(run, compiled, batch, self.cfg["train_steps"], deadline)
        step_s = statistics.median(result["step_s"]) if result["step_s"] else None
        result.update(median_step_s=step_s, images_per_s=cfg.batch_size / step_s if step_s else None)
        result["peak_device_memory_gb"] = _peak_memory_gb()
        if flops is None and time.perf_counter() < deadline - 30:
            start = time.perf_counter()
            flops = bt.flops_of(lowered) if remat_off else bt.model_flops(run, batch, lowered)
            result["model_flops_lowering_s"] = time.perf_counter() - start
        result["model_flops_per_step"] = flops
        if step_s and flops:
            result["model_tflops_per_s"] = flops / step_s / 1e12
            if peak:
                result["mfu"] = flops / step_s / peak
        return result


def _deleted(tree) -> bool:
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


def _peak_memory_gb():
    """The device's peak bytes in use so far (process-wide: the inference parts ran first, with less)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception as e:  # noqa: BLE001 - not every backend reports memory
        return f"unavailable: {type(e).__name__}"
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else "unavailable on this backend"


def summarize(parts: dict, batch: int) -> dict:
    def steady(name):
        return (parts.get(name) or {}).get("steady_s")

    out = {}
    for framework in ("jax", "torch"):
        c, b, a = (steady(f"{framework}_stage_{s}") for s in "cba")
        total = None if None in (c, b, a) else c + b + a
        out[framework] = {"stage_c_s": c, "stage_b_s": b, "stage_a_s": a, "stage_a_b_s": None if None in (a, b) else a + b,
                          "total_s": total, "images_per_s": batch / total if total else None}
    j, t = out["jax"], out["torch"]
    out["jax_over_torch"] = {k: j[k] / t[k] for k in ("stage_c_s", "stage_b_s", "stage_a_s", "total_s")
                             if j.get(k) and t.get(k)}
    if batch == PUBLISHED["batch"] and j["total_s"]:
        out["jax_over_published"] = {"stage_c": j["stage_c_s"] / PUBLISHED["stage_c_s"],
                                     "stage_a_b": j["stage_a_b_s"] / PUBLISHED["stage_a_b_s"],
                                     "total": j["total_s"] / PUBLISHED["total_s"]}
    return out


def markdown(data: dict) -> str:
    s, parts = data.get("summary", {}), data["parts"]
    env = parts.get("environment") or {}
    rows = ["| | Stage C s | Stage B s | Stage A s | total s | images/s |", "|---|---|---|---|---|---|"]
    f = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"
    for name in ("jax", "torch"):
        r = s.get(name, {})
        rows.append(f"| {name} | {f(r.get('stage_c_s'))} | {f(r.get('stage_b_s'))} | {f(r.get('stage_a_s'))} | "
                    f"{f(r.get('total_s'))} | {f(r.get('images_per_s'), 3)} |")
    rows.append(f"| published (diffusers) | {PUBLISHED['stage_c_s']} | {PUBLISHED['stage_a_b_s']} (A+B) | | "
                f"{PUBLISHED['total_s']} | {PUBLISHED['batch'] / PUBLISHED['total_s']:.3f} |")
    settings = data.get("settings", {})
    lines = [f"## GPU benchmark ({env.get('device_kind', '?')}, {'TINY smoke test' if data.get('tiny') else 'full models'})",
             "", f"bfloat16, batch {settings.get('batch')}, {settings.get('size')}², steps {settings.get('steps')}, "
                 "steady-state seconds (second run; the first includes compilation / warm-up).", "", *rows, ""]
    train = parts.get("train_stage_c") or {}
    for key in ("remat_full", "remat_none"):
        r = train.get(key) or {}
        if r.get("median_step_s"):
            mem = r.get("peak_device_memory_gb")
            lines.append(f"- Stage C train step ({train.get('config')}, {key}, batch {r.get('batch')}, latent "
                         f"{r.get('latent')}, fp32 weights / {train.get('compute_dtype')} compute): "
                         f"{f(r['median_step_s'], 3)} s, {f(r.get('images_per_s'))} img/s, "
                         f"{f(r.get('model_tflops_per_s'), 1)} TFLOP/s model, "
                         f"MFU {f(100 * r['mfu'], 1) + '%' if r.get('mfu') else '–'} (peak {train.get('peak_tflops')} "
                         f"TFLOP/s), compile {f(r.get('compile_s'), 0)} s, XLA step memory "
                         f"{f(r.get('xla_step_memory_gb'), 1)} GiB, device peak "
                         f"{f(mem, 1) + ' GiB' if isinstance(mem, float) else mem}")
        elif r:
            lines.append(f"- Stage C train step ({key}): {r.get('skipped') or r.get('error')}")
    for attempt in train.get("attempts", []):
        if "error" in attempt or "skipped" in attempt:
            lines.append(f"- Stage C train step at batch {attempt.get('batch')}: "
                         f"{attempt.get('error') or attempt.get('skipped')}")
    cudnn, xla = parts.get("jax_stage_c_cudnn_attention") or {}, parts.get("jax_stage_c") or {}
    if cudnn.get("steady_s") and xla.get("steady_s"):
        lines.append(f"- Stage C with cuDNN attention: {f(cudnn['steady_s'])} s vs {f(xla['steady_s'])} s with XLA's "
                     f"(the library's default); compile {f(cudnn.get('compile_s'), 1)} s")
    for name, part in parts.items():
        if isinstance(part, dict) and ("error" in part or "skipped" in part):
            lines.append(f"- {name}: {part.get('error') or part.get('skipped')}")
    return "\n".join(lines) + "\n"
