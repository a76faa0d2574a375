#!/usr/bin/env python
"""Rebuild the embedded demo cascade from scratch (``make demo-weights``).

    python train/demo.py [--work demo_build] [--out cascade_jax/demo/weights] [--images 6000] [--scale 1.0]

Generates the shapes dataset, makes the frozen encoders, trains Stage A, Stage B, Stage C and the
Previewer with this project's trainers (configs/training/demo_*.yaml) and publishes the result where
``--weights demo`` finds it. Interrupted? Run the same command again: finished steps are skipped and
the trainers resume from their checkpoints in --work. --scale multiplies every stage's updates
(e.g. 0.01 for a smoke run). Each stage's losses and time go to WORK/demo_report.json.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    from cascade_jax import demo
    from cascade_jax.demo.recipe import build_demo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="demo_build", help="dataset, checkpoints and logs (resumable)")
    p.add_argument("--out", default=str(demo.WEIGHTS_DIR), help="where the finished cascade is published")
    p.add_argument("--images", type=int, default=6000, help="training images to generate")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's updates by this")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.scale <= 0:
        p.error("--images must be >= 1 and --scale > 0")
    report = build_demo(args.work, args.out, images=args.images, scale=args.scale, seed=args.seed)
    print(json.dumps(report, indent=1))
    print(f"demo cascade written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
