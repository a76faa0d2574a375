#!/usr/bin/env python
"""Sample Stable Cascade with a ControlNet (canny, inpainting, super_resolution, identity).

  python sample/controlnet.py --control canny --weights WEIGHTS_DIR --controlnet canny.safetensors \
      --image photo.png --prompt "a watercolor of a lighthouse"
  python sample/controlnet.py --control inpainting --weights WEIGHTS_DIR --controlnet inpainting.safetensors \
      --image photo.png --mask mask.png --prompt "a red sports car"   # or --saliency saliency.safetensors [--outpaint]
  python sample/controlnet.py --control super_resolution --weights WEIGHTS_DIR \
      --controlnet super_resolution.safetensors --image small.png
  python sample/controlnet.py --control identity --weights WEIGHTS_DIR --controlnet identity_dir \
      --image face.png --faces faces.npz --prompt "an astronaut"

--mask: white (or 1) = generate there. --faces: an .npz with 'boxes' (N, 4: x0 y0 x1 y1 pixels) and
'embeddings' (N, 512 ArcFace) for the image (face detection is not included). --random tiny uses random
weights (noise-like images) instead of --weights/--controlnet. The control image the ControlNet saw is
written next to each result (control_NN_seedS.png).
"""

import argparse
import sys
import time

from cascade_jax.pipelines.control_request import ControlNetRequest
from cascade_jax.pipelines.controlnet import CONTROLS, ControlNetPipeline
from cascade_jax.pipelines.outputs import check_output_dir, output_paths, save_images, timing_report


DEFAULTS = ControlNetRequest("canny")  # the request's defaults are the flags' (the official values)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control", required=True, choices=CONTROLS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="cascade weights folder or Hugging Face repository id")
    src.add_argument("--random", choices=["tiny", "full"], help="random weights of this size (no download)")
    p.add_argument("--controlnet", help="converted ControlNet directory or the official .safetensors (with --weights)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default with --weights) or float32 (default with --random)")
    p.add_argument("--image", required=True, help="the control image (low-resolution input for super_resolution)")
    p.add_argument("--mask", help="inpainting: mask image, white = generate")
    p.add_argument("--saliency", help="inpainting without --mask: the official saliency net (converted dir or "
                                      "saliency_model.pt re-saved as .safetensors) makes the mask")
    p.add_argument("--mask-threshold", type=float, default=DEFAULTS.mask_threshold,
                   help="with --saliency: saliency above this is masked")
    p.add_argument("--outpaint", action="store_true", help="with --saliency: invert the mask (generate around)")
    p.add_argument("--faces", help="identity: .npz with 'boxes' (N, 4) and 'embeddings' (N, 512)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None, help="default: the image's (2x for super_resolution)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--strength", type=float, default=DEFAULTS.strength,
                   help="control strength (official cnet_multiplier)")
    p.add_argument("--control-start", type=int, default=DEFAULTS.control_start,
                   help="first Stage C step with control")
    p.add_argument("--control-stop", type=int, default=None, help="first Stage C step without it (default: none)")
    p.add_argument("--t-start", type=float, default=DEFAULTS.t_start,
                   help="inpainting: noise level Stage C starts from (0-1]")
    p.add_argument("--no-keep-unmasked", action="store_true", help="inpainting: do not paste back unmasked pixels")
    p.add_argument("--prior-steps", type=int, default=DEFAULTS.prior_steps)
    p.add_argument("--prior-cfg", type=float, default=None, help="default: 4 (1 for super_resolution)")
    p.add_argument("--decoder-steps", type=int, default=DEFAULTS.decoder_steps)
    p.add_argument("--out", default="out", help="folder for the PNGs")
    return p


def request_of(args) -> ControlNetRequest:
    """The command line's request (its flags are the request's fields)."""
    fields = {f: getattr(args, f) for f in ("control", "image", "mask", "saliency", "mask_threshold", "outpaint",
                                            "faces", "prompt", "negative_prompt", "height", "width", "seed",
                                            "strength", "control_start", "control_stop", "t_start", "prior_steps",
                                            "prior_cfg", "decoder_steps")}
    return ControlNetRequest(**fields, keep_unmasked=not args.no_keep_unmasked)


def parse_args(argv=None):
    """(arguments, request, result paths, control image paths), all checked before any model is built."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.weights and not args.controlnet:
            raise ValueError("--weights needs --controlnet (the ControlNet weights)")
        request = request_of(args)
        request.check()
        # One image per run (seed --seed); its result and control image names are fixed now, never overwriting.
        out = check_output_dir(args.out)
        paths = output_paths(out, args.control, [args.seed]), output_paths(out, "control", [args.seed])
    except ValueError as e:
        p.error(str(e))
    return args, request, *paths


def main(argv=None):
    args, request, paths, control_paths = parse_args(argv)
    start = time.perf_counter()
    try:
        inputs = request.load_inputs()  # a corrupt image fails before any model is built
        if args.random:
            print(f"Using RANDOM weights ({args.random} configuration): the images will be noise-like patterns.")
            pipe = ControlNetPipeline.random(args.control, args.random, dtype=args.dtype or "float32")
        else:
            pipe = ControlNetPipeline.from_pretrained(args.weights, args.controlnet, args.control,
                                                      dtype=args.dtype or "bfloat16")
        print(f"models ready in {time.perf_counter() - start:.1f}s; running {args.control}")
        settings = request.settings()
        result = request.run(pipe, inputs, settings)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(timing_report(result.timings))
    meta = request.metadata(settings, weights=args.weights or f"random:{args.random}",
                            controlnet=args.controlnet or "")
    written = save_images(paths, result.images, seeds=result.seeds, metadata=meta)
    written += save_images(control_paths, result.control_images, seeds=result.seeds, metadata=meta)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
