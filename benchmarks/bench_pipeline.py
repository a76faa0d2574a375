"""The whole text-to-image pipeline with random weights: compile time, steady-state time per
stage, the host overhead of the sampling loop against the sum of its model calls, and the per-step
cost of the progress callback.

Model-call time is a jitted single forward at the loop's shapes (the cond + uncond batch of
classifier-free guidance) times the number of steps; overhead = loop time / that - 1.
Callback cost: each stage's compiled loop run with and without a (no-op) per-step callback,
interleaved; cost per step = difference of the medians / steps. It must stay under 1% of a step at
the lite size (issue 8). Standalone, at a chosen size, without the rest of the section:

    python benchmarks/bench_pipeline.py --set tiny --size 128 --reps 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import jax.numpy as jnp

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_weights  # noqa: E402
from benchmarks.bench_forward import draw_inputs, jax_args, jax_forward  # noqa: E402
from benchmarks.harness import (RESULTS_DIR, alternate, log, machine_info, other_cpu_load, skipped,  # noqa: E402
                                summarize, timed, write_json)

CANDIDATE_SIZES = (1024, 768, 512, 384, 256, 192, 128)
# Building the lite pipeline (~15 s), compiling both sampling loops and two single forwards (XLA:CPU compile
# time follows program size, not image size: ~2 x 50 s here), the text encoder and Stage A (~15 s), and both
# loops again with the progress callback compiled in (~2 x 50 s).
FIXED_S = 240
CALLBACK_REPS = 2  # timed runs of each stage with and without the callback, after one untimed pair
CALLBACK_RUNS = 2 * (1 + CALLBACK_REPS)  # what they cost, in whole pipeline runs (both variants)
PROMPT = "a lighthouse on a cliff at sunset"


def build_pipeline(set_name: str, dtype: str = "float32", tokenizer_dir=None):
    """StableCascadePipeline with fast random weights (text-to-image needs no image encoders)."""
    from cascade_jax.data.clip_tokenizer import CLIPTokenizer
    from cascade_jax.pipelines import StableCascadePipeline
    from cascade_jax.pipelines.loading import default_tokenizer_dir, pipeline_set

    components = pipeline_set(set_name)
    models = {name: shared_weights.fast_random_model(*components[name], seed=i, dtype=dtype)
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
        if (2 + CALLBACK_RUNS) * run + per_call_timing + FIXED_S <= budget_s:
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
        est = (2 + CALLBACK_RUNS) * est_run + 2 * est_run * 4 / 15 + FIXED_S
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
    result["callback_overhead"] = callback_overheads(pipe, out, prior, decoder, batch, reps=CALLBACK_REPS)
    result["load_after"] = other_cpu_load()
    return result


def stage_inputs(pipe, out, prior, decoder, batch: int) -> dict:
    """stage -> (runner, settings, x_shape, cond, uncond) as text_to_image builds them for ``PROMPT``."""
    import jax.numpy as jnp
    cond_text, uncond_text = pipe.text.with_unconditional([PROMPT] * batch)
    zeros_img = jnp.zeros((batch, 1, pipe.c_clip_img), jnp.float32)
    effnet = jnp.asarray(out.stage_c_latents)
    return {
        "stage_c": (pipe.prior, prior, out.stage_c_latents.shape[1:], {**cond_text.stage_c(), "clip_img": zeros_img},
                    {**uncond_text.stage_c(), "clip_img": zeros_img}),
        "stage_b": (pipe.decoder, decoder, out.stage_b_latents.shape[1:], {"effnet": effnet, **cond_text.stage_b()},
                    {"effnet": jnp.zeros_like(effnet), **uncond_text.stage_b()}),
    }


def callback_overhead(runner, settings, x_shape, cond, uncond, batch: int, reps: int) -> dict:
    """The stage's loop with and without a no-op per-step callback (both compiled first), interleaved."""
    seeds, events = list(range(batch)), []
    runs = {"plain": lambda: runner(settings, tuple(x_shape), seeds, cond, uncond),
            "callback": lambda: runner(settings, tuple(x_shape), seeds, cond, uncond, callback=events.append)}
    samples = alternate(runs, reps, warmup=1)
    plain, with_cb = statistics.median(samples["plain"]), statistics.median(samples["callback"])
    step_s, per_step_s = plain / settings.steps, (with_cb - plain) / settings.steps
    return {"steps": settings.steps, "plain": summarize(samples["plain"]), "callback": summarize(samples["callback"]),
            "step_s": step_s, "callback_per_step_s": per_step_s, "callback_pct_of_step": 100 * per_step_s / step_s,
            "events": len(events)}


def callback_overheads(pipe, out, prior, decoder, batch: int, reps: int) -> dict:
    result = {}
    for stage, (runner, settings, x_shape, cond, uncond) in stage_inputs(pipe, out, prior, decoder, batch).items():
        result[stage] = r = callback_overhead(runner, settings, x_shape, cond, uncond, batch, reps)
        log(f"callback {stage}: {1e3 * r['callback_per_step_s']:+.3f} ms/step = {r['callback_pct_of_step']:+.2f}% "
            f"of a {1e3 * r['step_s']:.1f} ms step")
    return result


def bare_callback_cost(steps: int = 200, reps: int = 15) -> dict:
    """The hook alone: a scan of ``steps`` trivial steps with and without the stage runner's step hook
    (the same host callback and event delivery), so the per-step figure is the callback's own cost."""
    import jax
    from cascade_jax.pipelines import stage_runner

    def program(with_hook: bool):
        def loop(x, listener_id, positions):
            hook = stage_runner._step_hook(listener_id, positions, False) if with_hook else None

            def body(c, i):
                c = jnp.tanh(c) * 1.001
                if hook is not None:
                    hook(i, c, c)
                return c, None
            return jax.lax.scan(body, x, jnp.arange(steps))[0]
        return jax.jit(loop)

    x, positions = jnp.ones((1, 16, 16, 4)), jnp.arange(1, dtype=jnp.int32)
    listener_id = next(stage_runner._LISTENER_IDS)
    listener = stage_runner._Listener("bench", steps, 1, (16, 16, 4), False, lambda event: None)
    stage_runner._LISTENERS[listener_id] = listener

    def run(fn):
        listener.next, listener.pending = 0, {}
        fn(x, jnp.int32(listener_id), positions).block_until_ready()
        jax.effects_barrier()

    plain, hooked = program(False), program(True)
    samples = alternate({"plain": lambda: run(plain), "callback": lambda: run(hooked)}, reps, warmup=1)
    stage_runner._LISTENERS.pop(listener_id)
    per_step = (statistics.median(samples["callback"]) - statistics.median(samples["plain"])) / steps
    return {"steps": steps, "plain": summarize(samples["plain"]), "callback": summarize(samples["callback"]),
            "callback_per_step_s": per_step}


def main(argv=None) -> int:
    """Only the callback cost, at one size: build the pipeline, one run for the conditions, then time."""
    p = argparse.ArgumentParser(description="per-step progress-callback cost of the compiled stage loops")
    p.add_argument("--set", default="tiny", choices=["tiny", "lite", "full"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, nargs=2, default=(20, 10))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default results/callback_<set>_<size>.json)")
    args = p.parse_args(argv)
    from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS
    prior, decoder = PRIOR_DEFAULTS.replace(steps=args.steps[0]), DECODER_DEFAULTS.replace(steps=args.steps[1])
    pipe, _ = build_pipeline(args.set)
    out = pipe.text_to_image(PROMPT, height=args.size, width=args.size, num_images_per_prompt=args.batch,
                             prior=prior, decoder=decoder, decode=False)
    result = {"machine": machine_info(), "set": args.set, "size": args.size, "batch": args.batch, "dtype": "float32",
              "load_before": other_cpu_load(),
              "stages": callback_overheads(pipe, out, prior, decoder, args.batch, args.reps),
              "bare_hook": bare_callback_cost(),
              "load_after": other_cpu_load()}
    log(f"callback alone: {1e6 * result['bare_hook']['callback_per_step_s']:.0f} us/step")
    path = args.out or RESULTS_DIR / f"callback_{args.set}_{args.size}.json"
    write_json(path, result)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def median(values):
    return statistics.median(values) if values else None
