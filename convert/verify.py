#!/usr/bin/env python
"""Trust a conversion: run the converted JAX model and a PyTorch implementation on the same inputs.

  python convert/verify.py --converted ckpt/stage_c --torch modules.stage_c:StageC --torch-path ~/StableCascade
  python convert/verify.py --converted ckpt/prior --torch diffusers:StableCascadeUNet --checkpoint sc/prior
"""

import argparse
import sys

from cascade_jax.weights.verify import verify


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--converted", required=True, help="directory written by convert/convert.py")
    p.add_argument("--torch", required=True, help="PyTorch class as module:Class")
    p.add_argument("--torch-path", help="folder to put first on sys.path (a checkout of the official code)")
    p.add_argument("--checkpoint", help="safetensors file/folder for PyTorch (default: the conversion's source)")
    p.add_argument("--torch-config", help="JSON constructor config for the PyTorch class (default: the "
                                          "converted config, or the config.json beside a diffusers checkpoint)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, help="spatial size of the random input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |diff| / max |reference| allowed")
    args = p.parse_args(argv)
    try:
        report = verify(args.converted, args.torch, torch_path=args.torch_path, checkpoint=args.checkpoint,
                        torch_config=args.torch_config, batch=args.batch, size=args.size, seed=args.seed)
    except (ValueError, KeyError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worst = 0.0
    for name, (abs_err, rel_err) in report.items():
        print(f"{name:10s} max|diff| {abs_err:.3e}   relative {rel_err:.3e}")
        worst = max(worst, rel_err)
    verdict = "OK" if worst <= args.tolerance else "FAILED"
    print(f"{verdict}: worst relative error {worst:.3e} (tolerance {args.tolerance:.1e})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
