"""Where the demo cascade loses a prompt's attributes: each stage scored on its own (issue 13).

``accuracy`` scores the whole text -> image chain; this script scores the links, on rendered
images of held-out combinations (the data the links should pass through unchanged):

- ``data``: the rendered images themselves (the scorer's ceiling, 1.0);
- ``stage_a``: Stage A's encode -> decode round trip;
- ``effnet_previewer``: the Previewer's decoding of the images' EfficientNet latents (what Stage C
  learns to generate: what the latent keeps of the image);
- ``reconstruct``: EfficientNet latents -> Stage B (empty prompt) -> Stage A (``pipe.reconstruct``);
- ``reconstruct_captioned``: the same with each image's caption as Stage B's text, as Stage B is trained
  and as it samples after Stage C;
- ``stage_c_previewer``: text -> Stage C -> Previewer (what Stage C draws, read without Stage B).

Previews (8x the latent side) are enlarged to the image size (nearest) before scoring.

    python -m cascade_jax.demo.evaluate.stages                 # the shipped demo weights, 128 held-out images
    python -m cascade_jax.demo.evaluate.stages --weights DIR --images 256
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

from cascade_jax.demo.evaluate import load_pipeline, write_report
from cascade_jax.demo.evaluate.accuracy import COLUMNS
from cascade_jax.demo import shapes
from cascade_jax.demo.evaluate import RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "demo_stages.json"


def enlarge(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.NEAREST)) for i in images])


def stage_images(pipe, images: np.ndarray, captions: list[str], size: int, seed: int) -> dict:
    """name -> images (uint8, size x size) of each link of the chain, in the module docstring's order."""
    import jax.numpy as jnp

    from cascade_jax.pipelines.cascade import jitted_call

    latents = jitted_call(pipe.stage_a, jnp.asarray(images, jnp.float32) / 255.0, method="encode")
    prior = pipe.text_to_image(captions, height=size, width=size, seed=seed, decode=False)
    return {
        "data": images,
        "stage_a": pipe.decode(latents),
        "effnet_previewer": enlarge(pipe.preview(pipe.encode_effnet(images, size, size)), size),
        "reconstruct": pipe.reconstruct(list(images), seed=seed).images,
        "reconstruct_captioned": pipe.reconstruct(list(images), prompt=captions, seed=seed).images,
        "stage_c_previewer": enlarge(pipe.preview(prior.stage_c_latents), size),
    }


def markdown(report: dict) -> str:
    lines = [f"# Demo cascade, stage by stage: {report['weights']}", "",
             f"{report['date']}; {report['images']} rendered held-out images, {report['size']}x{report['size']}, "
             f"seed {report['seed']}. Scores by image analysis (shapes.score_image); chance is 1/8 colour and "
             "background, 1/3 shape, 1/5 position.", "",
             "| link | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, acc in report["stages"].items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[c]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="demo", help="'demo' (default) or a weights folder")
    p.add_argument("--images", type=int, default=128, help="held-out images to score (default 128)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT}); .md beside it")
    args = p.parse_args(argv)
    if args.images < 1:
        print(f"error: --images must be >= 1, got {args.images}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.weights)
    if pipe is None:
        return 2
    combos = shapes.sample_combos(args.images, seed=args.seed, split="heldout")
    rng = np.random.default_rng(args.seed)
    images = np.stack([shapes.render(c, args.size, rng) for c in combos])
    start = time.perf_counter()
    outputs = stage_images(pipe, images, [shapes.caption(c) for c in combos], args.size, args.seed)
    report = {"weights": args.weights, "images": args.images, "size": args.size, "seed": args.seed,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": round(time.perf_counter() - start, 1),
              "stages": {name: shapes.accuracy(out, combos) for name, out in outputs.items()}}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
