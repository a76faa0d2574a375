#!/usr/bin/env python
"""A web app (Gradio) on the Stable Cascade pipeline: text to image, image variation, image to image,
reconstruction, Stage C LoRAs and ControlNets.

  python sample/app.py                           # the embedded demo weights, http://127.0.0.1:7860
  python sample/app.py --weights WEIGHTS_DIR [--lite] [--lora LORA_DIR] [--controlnet canny.safetensors]
  python sample/app.py --random tiny             # random weights: noise-like images, for trying the app

One pipeline serves every user. Requests wait in a queue (at most --queue-size) and run one at a time
on the device, each with at most --max-images images; each new image size or sampler setting compiles
its programs once (the page says "compiling"), later requests of that shape reuse them. Results are
PNGs with the prompt, seed and settings in their metadata, as sample/generate.py writes them, kept in
--out (one folder per request, under an unguessable name).

Bounds, so that no request can hold the device or the memory for long: sizes up to --max-side pixels a
side (default twice the page's size); compiled programs are kept for a few sizes at a time (older ones
are dropped and compile again when asked for); uploads up to --max-upload-mb and --max-upload-mp
megapixels (checked from the file's header, before it is decoded), deleted after --upload-ttl minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from cascade_jax import storage
from cascade_jax.app.page import build_page, gradio
from cascade_jax.app.service import Service
from cascade_jax.app.startup import APP_CONTROLS, build_controlnets, find_loras, load_pipeline
from cascade_jax.pipelines.sizes import MIN_SIZE


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="weights folder, Hugging Face repository id, or 'demo' (the default: the "
                                       "demo weights shipped with cascade_jax)")
    src.add_argument("--random", choices=["tiny", "lite", "full"], help="random weights of this size (no download)")
    p.add_argument("--lite", action="store_true", help="use the lite Stage C/B weights from --weights")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="bfloat16 (default with --weights) or float32 (default with --random and the demo)")
    p.add_argument("--lora", metavar="DIR", help="a folder of Stage C LoRA files (*.safetensors) to pick from")
    p.add_argument("--controlnet", action="append", default=[], metavar="[TYPE=]FILE",
                   help=f"ControlNet weights (TYPE one of {', '.join(APP_CONTROLS)}; default: the file's name, as "
                        "the official canny.safetensors); 'random' with --random tiny; repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out", default=None, help="folder for the result PNGs (default: a new temporary folder)")
    p.add_argument("--max-images", type=int, default=4, help="most images one request may ask for")
    p.add_argument("--queue-size", type=int, default=16, help="most requests waiting at once; more are refused")
    p.add_argument("--size", type=int, default=None, help="the page's default image side (default 1024; 128 for "
                                                          "the demo and --random tiny)")
    p.add_argument("--max-side", type=int, default=None, help="largest image side a request may ask for (default: "
                                                              "twice the page's size: 2048, 256 for the demo)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest upload in MB (default 20)")
    p.add_argument("--max-upload-mp", type=float, default=24.0,
                   help="most megapixels of an uploaded image (default 24); larger ones are refused undecoded")
    p.add_argument("--upload-ttl", type=float, default=60.0,
                   help="minutes an upload is kept on the server (default 60); results in --out are kept")
    p.add_argument("--prior-steps", type=int, help="the page's default Stage C steps (default: the weights')")
    p.add_argument("--decoder-steps", type=int, help="the page's default Stage B steps (default: the weights')")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("max_images", "queue_size", "prior_steps", "decoder_steps", "max_upload_mb"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    for name in ("max_upload_mp", "upload_ttl"):
        if not 0 < getattr(args, name) < float("inf"):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive number")
    if args.max_side is not None and args.max_side < MIN_SIZE:
        raise SystemExit(f"error: --max-side must be at least {MIN_SIZE} (the smallest image side)")
    gradio()  # a missing extra fails now, not after the models load
    start = time.perf_counter()
    if args.out and storage.is_url(args.out):
        raise SystemExit(f"error: --out {args.out}: the app serves its results to the browser from a local folder; "
                         "name one (generate.py --out takes bucket URLs)")
    try:
        pipe, label, dtype = load_pipeline(args.weights, args.random, lite=args.lite, dtype=args.dtype)
        loras = find_loras(args.lora)
        controlnets = build_controlnets(args.controlnet, pipe, random=args.random, dtype=args.dtype)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out or tempfile.mkdtemp(prefix="cascade-app-"))
    out.mkdir(parents=True, exist_ok=True)
    small = args.random == "tiny" or label == "demo"
    size = args.size or (128 if small else 1024)
    service = Service(pipe, out_dir=out, weights_label=label, dtype=dtype, max_images=args.max_images, loras=loras,
                      controlnets=controlnets, max_side=args.max_side or 2 * size,
                      upload_pixels=int(args.max_upload_mp * 1e6), upload_ttl_min=args.upload_ttl)
    page = build_page(service, size, (args.prior_steps, args.decoder_steps))
    page.queue(max_size=args.queue_size, default_concurrency_limit=1)
    print(f"models ready in {time.perf_counter() - start:.1f}s; results go to {out}", flush=True)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out)], ssr_mode=False,
                show_error=True, quiet=False, max_file_size=f"{args.max_upload_mb}mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
