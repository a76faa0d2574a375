"""Per-step cost of a ControlNet in Stage C sampling, side by side in one process.

For a Stage C configuration (tiny: the tiny pipeline set; lite: the 1B Stage C with a ControlNet of
its width), the whole compiled sampling loop runs with and without control, alternating, on the
same conditions and seeds; the control's cost per step is the difference of the medians divided by
the steps. The ControlNet itself runs once per image (hint -> residuals), reported apart.

    python benchmarks/bench_controlnet.py                  # tiny, results/controlnet_tiny.json
    python benchmarks/bench_controlnet.py --size lite --steps 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS_DIR, alternate, machine_info, write_json  # noqa: E402
from cascade_jax.models.random_init import random_model  # noqa: E402
from cascade_jax.pipelines import PRIOR_DEFAULTS  # noqa: E402
from cascade_jax.pipelines.cascade import jitted_call  # noqa: E402
from cascade_jax.pipelines.controlnet import (ControlledStageC, ControlSettings, _ControlledPrior,  # noqa: E402
                                              resblock_widths)
from cascade_jax.pipelines.loading import pipeline_set  # noqa: E402
from cascade_jax.pipelines.stage_runner import StageRunner  # noqa: E402

# size -> (pipeline set, image side, ControlNet bottleneck, ResBlocks with a residual)
SIZES = {"tiny": ("tiny", 128, "effnet", None), "lite": ("lite", 1024, "effnet", 8)}


def conditions(stage_c, batch: int, rng):
    c_text = stage_c.clip_txt_mapper.weight.shape[0]
    c_img = stage_c.clip_img_mapper.weight.shape[0]
    cond = {"clip_text": rng.standard_normal((batch, 77, c_text), np.float32),
            "clip_text_pooled": rng.standard_normal((batch, 1, c_text), np.float32),
            "clip_img": np.zeros((batch, 1, c_img), np.float32)}
    return cond, {k: np.zeros_like(v) for k, v in cond.items()}


def measure(size: str, steps: int, repeats: int) -> dict:
    set_name, side, mode, n_blocks = SIZES[size]
    _, config = pipeline_set(set_name)["stage_c"]
    stage_c = random_model("stage_c", config, seed=0)
    widths = resblock_widths(stage_c)
    blocks = list(range(len(widths))) if n_blocks is None else \
        sorted({int(i) for i in np.linspace(0, len(widths) - 1, n_blocks)})
    cnet_config = {"c_in": 1, "c_proj": widths[0], "proj_blocks": blocks, "bottleneck_mode": mode}
    controlnet = random_model("controlnet", cnet_config, seed=1)
    rng = np.random.default_rng(0)
    hint = jnp.asarray(rng.random((1, side, side, 1), np.float32))
    cnet_times = alternate({"controlnet": lambda: jax.block_until_ready(jitted_call(controlnet, hint))}, repeats,
                           warmup=1)["controlnet"]
    residuals = list(jitted_call(controlnet, hint))
    cond, uncond = conditions(stage_c, 1, rng)
    settings = PRIOR_DEFAULTS.replace(steps=steps)
    latent = (-(-side * 3 // 128), -(-side * 3 // 128), 16)  # ceil(side / 42.67)
    plain = StageRunner("Stage C", stage_c)
    controlled = _ControlledPrior(StageRunner("Stage C", ControlledStageC(stage_c)), residuals, ControlSettings())
    runs = {"plain": lambda: jax.block_until_ready(plain(settings, latent, [0], cond, uncond)),
            "controlled": lambda: jax.block_until_ready(controlled(settings, latent, [0], cond, uncond))}
    samples = alternate(runs, repeats, warmup=1)  # the warm-up round compiles both before timing either
    plain_s, ctrl_s = (statistics.median(samples[n]) for n in ("plain", "controlled"))
    # The fastest run of each is the least disturbed by other processes on a shared machine.
    plain_min, ctrl_min = (min(samples[n]) for n in ("plain", "controlled"))
    return {"size": size, "image": side, "latent": list(latent), "steps": steps, "cfg_batch": 2,
            "residual_blocks": len(blocks), "controlnet": cnet_config | {"proj_blocks": len(blocks)},
            "stage_c_step_s": plain_s / steps, "controlled_step_s": ctrl_s / steps,
            "control_cost_per_step_s": (ctrl_s - plain_s) / steps,
            "control_cost_per_step_rel": ctrl_s / plain_s - 1,
            "min_stage_c_step_s": plain_min / steps, "min_controlled_step_s": ctrl_min / steps,
            "min_control_cost_per_step_rel": ctrl_min / plain_min - 1,
            "controlnet_forward_s": statistics.median(cnet_times), "samples_s": samples,
            "load_avg": os.getloadavg(), "backend": jax.default_backend()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.size, args.steps, args.repeats)
    write_json(RESULTS_DIR / f"controlnet_{args.size}.json", {"machine": machine_info(), **result})
    print(json.dumps({k: v for k, v in result.items() if k != "samples_s"}, indent=1))


if __name__ == "__main__":
    main()
