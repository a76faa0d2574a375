#!/usr/bin/env python
"""Merge LoRAs into a converted Stage C directory, or convert a LoRA file between formats.

  python convert/lora.py merge --model ckpt/stage_c --lora style.safetensors:0.8 [--lora ...] --output ckpt/stage_c_style
  python convert/lora.py convert --to comfyui --lora style.safetensors --output style_comfyui.safetensors [--config stage_c]
  python convert/lora.py convert --to official --lora comfy.safetensors --output style.safetensors --model ckpt/stage_c

Files may be in the official format (what the official LoRA trainer saves, and what this
project writes, with its settings in the metadata) or ComfyUI's Stable Cascade Stage C format.
"""

import argparse
import sys

from cascade_jax.pipelines.lora import parse_lora_spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="write a Stage C (or Stage B) directory with LoRAs merged into its weights")
    merge.add_argument("--model", required=True, help="converted Stage C directory (or Stage B, for a b_lcm LoRA)")
    merge.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                       help="LoRA file and strength (default 1); repeat for several")
    merge.add_argument("--output", required=True, help="new converted directory")
    merge.add_argument("--overwrite", action="store_true")
    conv = sub.add_parser("convert", help="rewrite a LoRA file in another format")
    conv.add_argument("--to", required=True, choices=["official", "comfyui"])
    conv.add_argument("--lora", required=True, help="input LoRA file")
    conv.add_argument("--output", required=True, help="output .safetensors")
    which = conv.add_mutually_exclusive_group()
    which.add_argument("--model", help="converted Stage C directory the LoRA is for")
    which.add_argument("--config", help="Stage C preset or config file (stage_c, stage_c_lite); needed for files "
                                        "that do not record their model")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from cascade_jax.weights.lora_merge import convert_lora_file, merge_loras_into_directory
    try:
        if args.command == "merge":
            specs = [parse_lora_spec(s) for s in args.lora]
            merge_loras_into_directory(args.model, [(s.path, s.strength) for s in specs], args.output,
                                       overwrite=args.overwrite)
        else:
            convert_lora_file(args.lora, args.output, args.to, model_dir=args.model, config=args.config)
    except (ValueError, OSError) as e:  # OSError covers missing, existing and unwritable paths
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
