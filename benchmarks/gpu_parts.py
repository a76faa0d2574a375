"""The parts of ``gpu_bench.py``: JAX and diffusers sampling per stage, Stage A decode, and the
Stage C training step. The diffusers UNets hold the JAX weights through DLPack (no second copy)."""

from __future__ import annotations

import gc
import math
import statistics
import time

import bridge
import jax
import jax.numpy as jnp
from flax import nnx
from gpu_bench import PEAK_BF16_TFLOPS, PUBLISHED, sync_time



def _time_twice(fn, device):
    """(last output, [first-run seconds, steady seconds]) of two synchronised runs."""
    times = []
    for _ in range(2):
        out, seconds = sync_time(fn, device)
        times.append(seconds)
    return out, times

class State:
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
            self.models[name] = bridge.fast_random_model(model_name, config, seed=0, dtype="bfloat16")
            jax.block_until_ready(nnx.state(self.models[name]))
            out[name] = {"params": bridge.param_count(self.models[name]), "build_s": time.perf_counter() - start}
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
            self.torch_models[name] = bridge.diffusers_unet(model_name, config, self.models[name], share=True,
                                                            device=device)
        return self.torch_models[name]

    def torch_stage_c(self) -> dict:
        import torch_loop
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
        import torch_loop
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
        import torch_loop
        torch, device = self._torch()
        config = self.cfg["configs"]["stage_a"][1]
        vq = bridge.diffusers_stage_a(config, self.models["stage_a"], share=True, device=device)
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
            self.models["stage_c"] = bridge.fast_random_model(model_name, config, seed=0, dtype="bfloat16")
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
        from bench_forward import compiled_flops
        from bench_train import init_state, make_step
        from flax import nnx

        _, config = self.cfg["configs"]["stage_c"]
        batch, shape = self.cfg["train_batch"], (self.hc, self.hc, 16)
        model = self.models.pop("stage_c")
        graphdef, params, opt_state, data = init_state(model, batch, shape, config)
        model.set_remat("full")  # the model's own per-block remat: part of the graph definition
        graphdefs = {"none": graphdef, "blocks": nnx.split(model)[0]}
        del model
        # Model flops: the step without remat, from the lowered (unoptimised) program; no compile needed.
        model_flops = compiled_flops(make_step(graphdef, "none").lower(params, opt_state, data, jax.random.key(1)))
        device_kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_kind), None)
        out = {"batch": batch, "latent": list(shape), "model_flops_per_step": model_flops, "peak_tflops": peak,
               "precision": "bfloat16 params, grads and AdamW moments (no fp32 master weights)"}
        deadline = time.perf_counter() + seconds_left - 20
        for remat in ("blocks", "none"):
            if time.perf_counter() > deadline - 60:
                out[f"remat_{remat}"] = {"skipped": "not enough time left before the deadline"}
                continue
            try:
                step = make_step(graphdefs[remat], remat)
                result, params, opt_state = self._train_variant(step, params, opt_state, data, batch, model_flops,
                                                                peak, deadline)
                out[f"remat_{remat}"] = result
            except Exception as e:  # noqa: BLE001 - e.g. out of memory without remat; recorded
                out[f"remat_{remat}"] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
            if params is None or any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(params)):
                break  # a failed step may have consumed the donated buffers
        return out

    def _train_variant(self, step, params, opt_state, data, batch, model_flops, peak, deadline):
        from bench_forward import compiled_flops

        start = time.perf_counter()
        compiled = step.lower(params, opt_state, data, jax.random.key(2)).compile()
        compile_s = time.perf_counter() - start
        times, loss = [], None
        for i in range(self.cfg["train_steps"] + 1):
            start = time.perf_counter()
            params, opt_state, loss = compiled(params, opt_state, data, jax.random.key(3 + i))
            loss = float(loss)
            if i:
                times.append(time.perf_counter() - start)
            if time.perf_counter() > deadline:
                break
        step_s = statistics.median(times) if times else None
        result = {"compile_s": compile_s, "step_s": times, "median_step_s": step_s, "loss": loss,
                  "hardware_flops_per_step": compiled_flops(compiled)}
        if step_s:
            result["images_per_s"] = batch / step_s
            if model_flops:
                result["model_tflops_per_s"] = model_flops / step_s / 1e12
                if peak:
                    result["mfu"] = result["model_tflops_per_s"] / peak
        try:
            stats = jax.devices()[0].memory_stats() or {}
            result["peak_device_memory_gb"] = stats.get("peak_bytes_in_use", 0) / 2**30
        except Exception as e:  # noqa: BLE001 - not every backend reports memory
            result["peak_device_memory_gb"] = f"unavailable: {type(e).__name__}"
        return result, params, opt_state


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
    for key in ("remat_blocks", "remat_none"):
        r = train.get(key) or {}
        if "median_step_s" in r:
            lines.append(f"- Stage C train step ({key}, batch {train.get('batch')}): {f(r['median_step_s'], 3)} s, "
                         f"{f(r.get('images_per_s'))} img/s, {f(r.get('model_tflops_per_s'), 1)} TFLOP/s model, "
                         f"MFU {f(100 * r['mfu'], 1) + '%' if r.get('mfu') else '–'} (peak {train.get('peak_tflops')} "
                         f"TFLOP/s), peak memory {r.get('peak_device_memory_gb')}")
        elif r:
            lines.append(f"- Stage C train step ({key}): {r.get('skipped') or r.get('error')}")
    cudnn, xla = parts.get("jax_stage_c_cudnn_attention") or {}, parts.get("jax_stage_c") or {}
    if cudnn.get("steady_s") and xla.get("steady_s"):
        lines.append(f"- Stage C with cuDNN attention: {f(cudnn['steady_s'])} s vs {f(xla['steady_s'])} s with XLA's "
                     f"(the library's default); compile {f(cudnn.get('compile_s'), 1)} s")
    for name, part in parts.items():
        if isinstance(part, dict) and ("error" in part or "skipped" in part):
            lines.append(f"- {name}: {part.get('error') or part.get('skipped')}")
    return "\n".join(lines) + "\n"
