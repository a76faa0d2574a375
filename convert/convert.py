#!/usr/bin/env python
"""Convert a Stable Cascade PyTorch checkpoint to a cascade-jax model directory, or export one back.

  python convert/convert.py --model stage_c --config stage_c --input stage_c_bf16.safetensors --output ckpt/stage_c
  python convert/convert.py --export --input ckpt/stage_c --output stage_c.safetensors

Every path may also be a gs:// or s3:// URL (converted directories: local or gs://; see the README).
"""

import argparse
import sys
import time

from cascade_jax.models.registry import MODEL_CLASSES, list_presets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL_CLASSES), help="which model the checkpoint holds")
    p.add_argument("--config", help=f"preset ({', '.join(list_presets())}) or a YAML/JSON file of constructor "
                                    "arguments; default: the config.json beside a diffusers/transformers checkpoint")
    p.add_argument("--input", required=True, help="safetensors file, shard index or folder (or, with --export, "
                                                  "a converted directory)")
    p.add_argument("--output", required=True, help="converted directory (or, with --export, a .safetensors file)")
    p.add_argument("--dtype", default=None, help="float32 (default for conversion) or bfloat16; with --export: "
                                                 "force this dtype instead of the source file's")
    p.add_argument("--format", default=None, help="force the source format (official, diffusers); default: detect")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--export", action="store_true", help="export a converted directory to official safetensors")
    args = p.parse_args(argv)
    if not args.export and not args.model:
        p.error("--model is required to convert")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.export:
            from cascade_jax import storage
            from cascade_jax.weights.export import export_official
            if storage.exists(args.output) and not args.overwrite:
                raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")
            export_official(args.input, args.output, dtype=args.dtype)
        else:
            from cascade_jax.weights.convert import convert_checkpoint
            convert_checkpoint(args.model, args.config, args.input, args.output, dtype=args.dtype or "float32",
                               fmt=args.format, overwrite=args.overwrite)
    except (ValueError, KeyError, TypeError, OSError, ImportError) as e:  # ImportError: a URL without [cloud]
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
