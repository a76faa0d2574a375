#!/usr/bin/env python
"""Distil the embedded demo's Stage C into the demo-lcm LCM-LoRA (``make demo-lcm-weights``).

    python train/demo_lcm.py [--work demo_build/lcm] [--out cascade_jax/demo/lcm] [--images 4000] [--scale 1.0]

Generates the shapes dataset, runs the c_lcm task (configs/training/demo_lcm.yaml) with the shipped demo Stage C
as the teacher, and publishes the LoRA with its sampling.json where ``--weights demo-lcm`` finds it.
Interrupted? Run it again: finished steps are skipped and the trainer resumes from its checkpoints in --work.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    from cascade_jax import demo
    from cascade_jax.demo.lcm_recipe import build_demo_lcm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="demo_build/lcm", help="dataset, checkpoints and logs (resumable)")
    p.add_argument("--out", default=str(demo.LCM_DIR), help="where the LCM-LoRA and its sampling.json go")
    p.add_argument("--weights", default=None, help="the demo weights folder to distil (default: the shipped one)")
    p.add_argument("--images", type=int, default=4000, help="training images to generate")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the updates by this")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.scale <= 0:
        p.error(f"--images must be >= 1 and --scale > 0, got {args.images} and {args.scale}")
    report = build_demo_lcm(args.work, args.out, args.weights, images=args.images, scale=args.scale, seed=args.seed)
    print(json.dumps(report, indent=1))
    print(f"demo-lcm written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
