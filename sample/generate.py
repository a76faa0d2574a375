#!/usr/bin/env python
"""Generate images with Stable Cascade in JAX.

  python sample/generate.py text2img --weights WEIGHTS_DIR --prompt "an astronaut riding a horse"
  python sample/generate.py variation --weights WEIGHTS_DIR --image photo.png
  python sample/generate.py img2img --weights WEIGHTS_DIR --image photo.png --prompt "oil painting" --strength 0.7
  python sample/generate.py reconstruct --weights WEIGHTS_DIR --image photo.png

WEIGHTS_DIR holds converted directories, the official safetensors (stage_c_bf16.safetensors, ...,
text_encoder/, tokenizer/) or the diffusers folders; --random tiny|lite uses random weights instead.
"""

import argparse
import sys
import time

from PIL import Image

from cascade_jax.pipelines import StableCascadePipeline, StageSettings, check_image_size
from cascade_jax.pipelines.outputs import save_images, timing_report


def stage_args(p, name, steps, cfg, shift):
    p.add_argument(f"--{name}-steps", type=int, default=steps)
    p.add_argument(f"--{name}-cfg", type=float, default=cfg)
    p.add_argument(f"--{name}-shift", type=float, default=shift)
    p.add_argument(f"--{name}-sampler", default="ddpm", choices=["ddpm", "ddim", "lcm"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["text2img", "variation", "img2img", "reconstruct"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="weights folder or Hugging Face repository id")
    src.add_argument("--random", choices=["tiny", "lite", "full"], help="random weights of this size (no download)")
    p.add_argument("--lite", action="store_true", help="use the lite Stage C/B weights from --weights")
    p.add_argument("--dtype", default=None, help="bfloat16 (default with --weights) or float32 (default with --random)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--image", help="input image (variation, img2img, reconstruct)")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how far to noise the image (0-1]")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    stage_args(p, "prior", 20, 4.0, 2.0)
    stage_args(p, "decoder", 10, 1.1, 1.0)
    p.add_argument("--out", default="out", help="folder for the PNGs")
    p.add_argument("--preview", action="store_true", help="also save previewer images of the Stage C latents")
    args = p.parse_args(argv)
    if args.mode != "text2img" and not args.image:
        p.error(f"{args.mode} needs --image")
    # Fail in a second, before any model is built (img2img and reconstruct take the image's size).
    try:
        if args.mode in ("text2img", "variation"):
            check_image_size(args.height, args.width)
        if args.mode == "img2img" and not 0 < args.strength <= 1:
            raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
        if args.num_images < 1:
            raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    except ValueError as e:
        p.error(str(e))
    return args


def settings(args, name):
    return StageSettings(steps=getattr(args, f"{name}_steps"), cfg=getattr(args, f"{name}_cfg"),
                         shift=getattr(args, f"{name}_shift"), sampler=getattr(args, f"{name}_sampler"))


def run(args, pipe):
    prior, decoder = settings(args, "prior"), settings(args, "decoder")
    common = dict(seed=args.seed)
    if args.mode == "text2img":
        return pipe.text_to_image(args.prompt, args.negative_prompt, height=args.height, width=args.width,
                                  num_images_per_prompt=args.num_images, prior=prior, decoder=decoder, **common)
    image = Image.open(args.image).convert("RGB")
    if args.mode == "variation":
        return pipe.image_variation(image, prompt=args.prompt, height=args.height, width=args.width,
                                    num_images_per_prompt=args.num_images, prior=prior, decoder=decoder, **common)
    if args.mode == "img2img":
        return pipe.image_to_image(image, args.prompt, args.negative_prompt, strength=args.strength, prior=prior,
                                   decoder=decoder, **common)
    return pipe.reconstruct(image, prompt=args.prompt, decoder=decoder, **common)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.random:
            print(f"Using RANDOM weights ({args.random} configuration): the images will be noise-like patterns, "
                  "not pictures. Pass --weights to use real Stable Cascade weights.")
            pipe = StableCascadePipeline.random(args.random, dtype=args.dtype or "float32")
        else:
            pipe = StableCascadePipeline.from_pretrained(args.weights, lite=args.lite, dtype=args.dtype or "bfloat16")
        print(f"models ready in {time.perf_counter() - start:.1f}s; running {args.mode}")
        result = run(args, pipe)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(timing_report(result.timings))
    meta = {"mode": args.mode, "prompt": args.prompt, "negative_prompt": args.negative_prompt or "",
            "prior": vars(settings(args, "prior")), "decoder": vars(settings(args, "decoder")),
            "weights": args.weights or f"random:{args.random}", "dtype": args.dtype or ""}
    paths = save_images(args.out, result.images, prefix=args.mode, seeds=result.seeds, metadata=meta)
    if args.preview:
        save_images(args.out, pipe.preview(result.stage_c_latents), prefix="preview", seeds=result.seeds, metadata=meta)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
