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

import numpy as np

from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS
from cascade_jax.pipelines.controlnet import (CONTROLS, ControlNetPipeline, ControlSettings, controlled_steps,
                                              output_size, saliency_function)
from cascade_jax.pipelines.images import image_size, load_grey, load_image, local_file
from cascade_jax.pipelines.outputs import check_output_dir, output_paths, save_images, timing_report


def parse_args(argv=None):
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
    p.add_argument("--mask-threshold", type=float, default=0.2, help="with --saliency: saliency above this is masked")
    p.add_argument("--outpaint", action="store_true", help="with --saliency: invert the mask (generate around)")
    p.add_argument("--faces", help="identity: .npz with 'boxes' (N, 4) and 'embeddings' (N, 512)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None, help="default: the image's (2x for super_resolution)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=1.0, help="control strength (official cnet_multiplier)")
    p.add_argument("--control-start", type=int, default=0, help="first Stage C step with control")
    p.add_argument("--control-stop", type=int, default=None, help="first Stage C step without it (default: none)")
    p.add_argument("--t-start", type=float, default=1.0, help="inpainting: noise level Stage C starts from (0-1]")
    p.add_argument("--no-keep-unmasked", action="store_true", help="inpainting: do not paste back unmasked pixels")
    p.add_argument("--prior-steps", type=int, default=PRIOR_DEFAULTS.steps)
    p.add_argument("--prior-cfg", type=float, default=None, help="default: 4 (1 for super_resolution)")
    p.add_argument("--decoder-steps", type=int, default=DECODER_DEFAULTS.steps)
    p.add_argument("--out", default="out", help="folder for the PNGs")
    args = p.parse_args(argv)
    try:
        check_inputs(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_inputs(args):
    """Everything that can be checked before a model is built (nothing is decoded: the image's size comes
    from its header, or from ``args.image_array`` when the image is given as pixels, as the app does)."""
    if args.weights and not args.controlnet:
        raise ValueError("--weights needs --controlnet (the ControlNet weights)")
    has_mask = args.mask or getattr(args, "mask_array", None) is not None
    if args.control == "inpainting" and not (has_mask or args.saliency):
        raise ValueError("inpainting needs --mask, or --saliency with the official saliency net for automatic masks "
                         "(its weights are not included)")
    if args.control == "identity" and not args.faces:
        raise ValueError("identity needs --faces (boxes and ArcFace embeddings; face detection is not included)")
    if not 0 < args.t_start <= 1:
        raise ValueError(f"--t-start must be in (0, 1], got {args.t_start}")
    if args.prior_steps < 1 or args.decoder_steps < 1:
        raise ValueError("--prior-steps and --decoder-steps must be at least 1")
    # (--strength, --control-start, --control-stop: the messages name them as "control strength/start/stop")
    ControlSettings(args.strength, args.control_start, args.control_stop).check(
        controlled_steps(args.control, args.prior_steps, args.t_start))
    for name in ("image", "mask", "faces"):  # (--saliency may also be a converted directory: checked at load)
        path = getattr(args, name)
        if path:
            local_file(path, f"--{name} {path}")  # a local file or an object in a bucket (copied once)
    array = getattr(args, "image_array", None)
    image_hw = array.shape[:2] if array is not None else image_size(args.image)  # refuses bombs
    output_size(args.control, tuple(image_hw), args.height, args.width)
    # One image per run (seed --seed); its result and control image names are fixed now, never overwriting.
    out = check_output_dir(args.out)
    args.paths = output_paths(out, args.control, [args.seed])
    args.control_paths = output_paths(out, "control", [args.seed])


def read_images(args):
    """args.image_array (and args.mask_array): the pixels, decoded now unless given (as the app gives them)."""
    if getattr(args, "image_array", None) is None:
        args.image_array = load_image(args.image)
    if getattr(args, "mask_array", None) is None:
        args.mask_array = load_grey(args.mask) if args.mask else None


def read_faces(path):
    with np.load(local_file(path, f"--faces {path}")) as data:
        if "boxes" not in data or "embeddings" not in data:
            raise ValueError(f"{path} must hold arrays 'boxes' (N, 4) and 'embeddings' (N, 512), has {data.files}")
        return [data["boxes"]], [data["embeddings"]]


def run(args, pipe):
    cfg = args.prior_cfg if args.prior_cfg is not None else (None if args.control == "super_resolution" else 4.0)
    prior = PRIOR_DEFAULTS.replace(steps=args.prior_steps, cfg=None if cfg == 1 else cfg)
    decoder = DECODER_DEFAULTS.replace(steps=args.decoder_steps)
    control = ControlSettings(args.strength, args.control_start, args.control_stop)
    read_images(args)
    mask = args.mask_array
    faces = read_faces(args.faces) if args.faces else None
    saliency = saliency_function(args.saliency) if args.saliency and mask is None else None
    return pipe(args.image_array, args.prompt, args.negative_prompt, mask=mask, faces=faces,
                saliency_fn=saliency, mask_threshold=args.mask_threshold, outpaint=args.outpaint,
                height=args.height, width=args.width, seed=args.seed, control=control, prior=prior, decoder=decoder,
                t_start=args.t_start, keep_unmasked=not args.no_keep_unmasked), prior, decoder


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        read_images(args)  # a corrupt image fails before any model is built
        if args.random:
            print(f"Using RANDOM weights ({args.random} configuration): the images will be noise-like patterns.")
            pipe = ControlNetPipeline.random(args.control, args.random, dtype=args.dtype or "float32")
        else:
            pipe = ControlNetPipeline.from_pretrained(args.weights, args.controlnet, args.control,
                                                      dtype=args.dtype or "bfloat16")
        print(f"models ready in {time.perf_counter() - start:.1f}s; running {args.control}")
        result, prior, decoder = run(args, pipe)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(timing_report(result.timings))
    meta = {"mode": f"controlnet:{args.control}", "prompt": args.prompt, "negative_prompt": args.negative_prompt or "",
            "control": {"strength": args.strength, "start": args.control_start, "stop": args.control_stop},
            "prior": {"steps": prior.steps, "cfg": prior.cfg, "shift": prior.shift},
            "decoder": {"steps": decoder.steps, "cfg": decoder.cfg, "shift": decoder.shift},
            "weights": args.weights or f"random:{args.random}", "controlnet": args.controlnet or ""}
    paths = save_images(args.paths, result.images, seeds=result.seeds, metadata=meta)
    paths += save_images(args.control_paths, result.control_images, seeds=result.seeds, metadata=meta)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
