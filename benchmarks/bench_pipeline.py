"""The whole text-to-image pipeline with random weights: compile time, steady-state time per
stage, and the host overhead of the sampling loop against the sum of its model calls.

Model-call time is a jitted single forward at the loop's shapes (the cond + uncond batch of
classifier-free guidance) times the number of steps; overhead = loop time / that - 1.
"""

from __future__ import annotations

import math
import statistics
import time

import bridge
import jax.numpy as jnp
from bench_forward import draw_inputs, jax_args, jax_forward
from common import log, other_cpu_load, skipped, summarize, timed

CANDIDATE_SIZES = (1024, 768, 512, 384, 256, 192, 128)
# Building the lite pipeline (~15 s), compiling both sampling loops and two single forwards (XLA:CPU compile
# time follows program size, not image size: ~2 x 50 s here), the text encoder and Stage A (~15 s).
FIXED_S = 140
PROMPT = "a lighthouse on a cliff at sunset"


def build_pipeline(set_name: str, dtype: str = "float32", tokenizer_dir=None):
    """StableCascadePipeline with fast random weights (text-to-image needs no image encoders)."""
    from cascade_jax.data.clip_tokenizer import CLIPTokenizer
    from cascade_jax.pipelines import StableCascadePipeline
    from cascade_jax.pipelines.loading import default_tokenizer_dir, pipeline_set

    components = pipeline_set(set_name)
    models = {name: bridge.fast_random_model(*components[name], seed=i, dtype=dtype)
              for i, name in enumerate(("stage_c", "stage_b", "stage_a", "text_encoder"))}
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir or default_tokenizer_dir())
    return StableCascadePipeline(**models, tokenizer=tokenizer), components


def stage_shapes(size: int) -> dict:
    return {"stage_c": (math.ceil(size / 42.67), math.ceil(size / 42.67), 16), "stage_b": (size // 4, size // 4, 4)}


def estimate_run_s(flops_1024: dict, size: int, steps: dict, batch: int, gflops: float) -> float:
    """One text_to_image call from 1024^2 forward flops scaled by latent area, CFG batch 2B."""
    shapes, ref = stage_shapes(size), stage_shapes(1024)
    total = 0.0
    for stage in ("stage_c", "stage_b"):
        scale = (shapes[stage][0] * shapes[stage][1]) / (ref[stage][0] * ref[stage][1])
        total += flops_1024[stage] * scale * 2 * batch * steps[stage]
    return total / (gflops * 1e9)


def pick_size(flops_1024: dict, steps: dict, batch: int, gflops: float, budget_s: float, fixed: int | None):
    """The largest candidate size whose two pipeline runs + call timing + compiles fit ``budget_s``."""
    if fixed:
        return fixed, estimate_run_s(flops_1024, fixed, steps, batch, gflops)
    for size in CANDIDATE_SIZES:
        run = estimate_run_s(flops_1024, size, steps, batch, gflops)
        per_call_timing = run * 4 / sum(steps.values()) * 2  # 1 + 3 forwards of each stage, 2 stages
        if 2 * run + per_call_timing + FIXED_S <= budget_s:
            return size, run
    return None, estimate_run_s(flops_1024, CANDIDATE_SIZES[-1], steps, batch, gflops)


def model_call_times(pipe, components: dict, size: int, batch: int, reps: int = 3) -> dict:
    """Median seconds of one jitted forward of each stage at the loop's (2B) shapes."""
    out = {}
    for stage, runner in (("stage_c", pipe.prior), ("stage_b", pipe.decoder)):
        model_name, config = components[stage]
        from flax import nnx
        model = nnx.merge(runner.graphdef, runner.state)
        inputs = draw_inputs(model_name, config, 2 * batch, stage_shapes(size)[stage])
        args = jax_args(model_name, inputs, jnp.float32)
        compiled, state, compile_s, flops = jax_forward(model, args)
        def run(compiled=compiled, state=state, args=args):
            return compiled(state, *args).block_until_ready()

        run()
        samples = [timed(run) for _ in range(reps)]
        out[stage] = {"cfg_batch": 2 * batch, "compile_s": compile_s, "flops": flops, **summarize(samples)}
    return out


def run_pipeline_section(budget, gflops: float, flops_1024: dict, *, set_name="lite", size: int | None = None,
                         batch: int = 1, steps=(20, 10), tokenizer_dir=None, section_budget_s: float = 300.0) -> dict:
    import dataclasses

    from cascade_jax.pipelines.cascade import DECODER_DEFAULTS, PRIOR_DEFAULTS
    prior = dataclasses.replace(PRIOR_DEFAULTS, steps=steps[0])
    decoder = dataclasses.replace(DECODER_DEFAULTS, steps=steps[1])
    step_counts = {"stage_c": prior.steps, "stage_b": decoder.steps}
    chosen, est_run = pick_size(flops_1024, step_counts, batch, gflops, min(section_budget_s, budget.remaining()), size)
    result = {"set": set_name, "batch": batch, "steps": step_counts, "cfg": {"stage_c": prior.cfg, "stage_b": decoder.cfg},
              "dtype": "float32", "estimated_run_s": est_run}
    if chosen is None:
        log(f"pipeline: skipped, even {CANDIDATE_SIZES[-1]}^2 needs ~{est_run:.0f}s per run")
        return {**result, **skipped(f"even {CANDIDATE_SIZES[-1]}^2 needs about {est_run:.0f}s per run; "
                                    f"{min(section_budget_s, budget.remaining()):.0f}s left for this section")}
    result["size"] = chosen
    if budget.dry_run:
        est = 2 * est_run * (1 + 4 / 15) + FIXED_S
        budget.consume(est)
        log(f"pipeline: dry run, would run at {chosen}^2, ~{est:.0f}s")
        return {**result, **skipped(f"dry run: would run at {chosen}^2, ~{est:.0f}s")}
    result["size_note"] = (f"{chosen}^2, as asked" if size else "1024^2 (the official size)" if chosen == 1024 else
                           f"{chosen}^2: the largest candidate {CANDIDATE_SIZES} whose runs fit this section's "
                           f"budget ({section_budget_s:.0f}s) at {gflops:.0f} GFLOP/s")
    result["load_before"] = other_cpu_load()
    start = time.perf_counter()
    pipe, components = build_pipeline(set_name, tokenizer_dir=tokenizer_dir)
    result["build_s"] = time.perf_counter() - start
    runs = []
    for i in range(2):  # first: compiles; second: steady state (compiled programs cached)
        start = time.perf_counter()
        out = pipe.text_to_image(PROMPT, height=chosen, width=chosen, num_images_per_prompt=batch, seed=i,
                                 prior=prior, decoder=decoder)
        wall = time.perf_counter() - start
        runs.append({"wall_s": wall, **{stage: dataclasses.asdict(t) for stage, t in out.timings.items()}})
        log(f"pipeline {chosen}^2 run {i}: wall {wall:.1f}s " +
            ", ".join(f"{k} compile {t.compile_s:.1f}s sample {t.sample_s:.1f}s" for k, t in out.timings.items()))
    result["runs"] = runs
    # Stage A as the pipeline decodes (the call inside text_to_image): first call, then again.
    latents = out.stage_b_latents
    result["stage_a_decode_first_s"] = timed(lambda: pipe.decode(latents))
    result["stage_a_decode_s"] = timed(lambda: pipe.decode(latents))
    calls = model_call_times(pipe, components, chosen, batch)
    result["model_calls"] = calls
    steady = runs[-1]
    overhead = {}
    for stage in ("stage_c", "stage_b"):
        model_time = calls[stage]["median_s"] * step_counts[stage]
        loop = steady[stage]["sample_s"]
        overhead[stage] = {"loop_s": loop, "model_calls_s": model_time, "overhead_pct": 100 * (loop / model_time - 1)}
    result["loop_overhead"] = overhead
    result["stage_s_steady"] = {k: steady[k]["sample_s"] for k in ("stage_c", "stage_b")}
    result["compile_s"] = {k: runs[0][k]["compile_s"] for k in ("stage_c", "stage_b")}
    result["images_per_s_steady"] = batch / steady["wall_s"]
    result["load_after"] = other_cpu_load()
    return result


def median(values):
    return statistics.median(values) if values else None
