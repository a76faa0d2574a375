"""Why the train step skips ``lax.scan`` when ``grad_accum_steps`` is 1 (training/step.py).

Times, side by side in one process, the gradient of the demo cascade's EfficientNet (configs/pipelines/
demo.yaml, batch 32 at 96x96, the demo_effnet step's encoder half) computed directly and inside a
``lax.scan`` of length 1 (what the step did for one micro-batch). On XLA:CPU the loop body runs its
convolutions several times slower; results go to benchmarks/results/scan_overhead.{json,md}.

    python benchmarks/scan_overhead.py [--batch 32] [--repeats 6]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from benchmarks.common import alternate, machine_info, ratio, summarize, write_text  # noqa: E402


def contenders(batch: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cascade_jax.models.random_init import random_model
    from cascade_jax.pipelines.loading import pipeline_set

    effnet = random_model(*pipeline_set("demo")["effnet"], seed=1)
    graphdef, params, rest = nnx.split(effnet, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).random((batch, 96, 96, 3)), jnp.float32)

    def loss(params, x):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(x)))

    def in_scan(params, x):
        _, grads = jax.lax.scan(lambda carry, xi: (carry, jax.grad(loss)(params, xi)), 0, x[None])
        return grads

    runs, compile_s = {}, {}
    for name, fn in (("direct", jax.grad(loss)), ("scan_of_1", in_scan)):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(params, x).compile()
        compile_s[name] = round(time.perf_counter() - start, 2)
        runs[name] = lambda compiled=compiled: jax.block_until_ready(compiled(params, x))
    return runs, compile_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "scan_overhead.json")
    args = p.parse_args(argv)
    runs, compile_s = contenders(args.batch)
    stats = {name: summarize(s) for name, s in alternate(runs, args.repeats, warmup=1).items()}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "batch": args.batch, "compile_s": compile_s, "timings": stats,
              "scan_over_direct": ratio(stats["scan_of_1"], stats["direct"]), "machine": machine_info()}
    write_text(args.out, json.dumps(report, indent=1))
    md = (f"# Gradient of the demo EfficientNet, directly and in a length-1 lax.scan\n\n{report['date']}; batch "
          f"{args.batch} at 96x96, median of {args.repeats} interleaved runs.\n\n| form | step (ms) | compile (s) |\n"
          "|---|---|---|\n" + "".join(f"| {n} | {1000 * stats[n]['median_s']:.0f} | {compile_s[n]} |\n" for n in runs)
          + f"\nscan / direct: {report['scan_over_direct']:.2f}x\n")
    write_text(args.out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
