#!/usr/bin/env python
"""Generate images with Stable Cascade in JAX.

  python sample/generate.py text2img --prompt "a red circle in the top left on a blue background"
  python sample/generate.py text2img --weights WEIGHTS_DIR --prompt "an astronaut riding a horse"
  python sample/generate.py variation --weights WEIGHTS_DIR --image photo.png
  python sample/generate.py img2img --weights WEIGHTS_DIR --image photo.png --prompt "oil painting" --strength 0.7
  python sample/generate.py reconstruct --weights WEIGHTS_DIR --image photo.png
  python sample/generate.py text2img --plan v5e-1 --num-images 4   # does the cascade fit one v5e chip?

WEIGHTS_DIR holds converted directories, the official safetensors (stage_c_bf16.safetensors, ...,
text_encoder/, tokenizer/), the diffusers folders or a trainer's export; several --weights combine folders
(--weights C_EXPORT --weights B_EXPORT: each gives what it holds; two different copies of one component
are refused); without --weights the embedded demo cascade
(128x128 coloured shapes, see cascade_jax/demo) is used; --random tiny|lite uses random weights instead.
Every argument and the input image are checked before any model loads. Earlier results in --out are
kept (new names get a -N suffix) unless --overwrite is given.
"""

import argparse
import dataclasses
import sys
import time

from tqdm import tqdm

from cascade_jax import demo
from cascade_jax.named_weights import lookup
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline, check_image_size
from cascade_jax.pipelines import arguments as checks
from cascade_jax.pipelines.images import load_image, round_size
from cascade_jax.pipelines.lora import check_lora_files
from cascade_jax.pipelines.outputs import check_output_dir, output_paths, save_images, timing_report
from cascade_jax.sharding import parse_mesh_spec
from cascade_jax.weights.cache import enable_compilation_cache

IMAGE_MODES = ("variation", "img2img", "reconstruct")
STAGE_FLAGS = ("steps", "cfg", "shift", "t_start", "sampler")


def stage_args(p, name, defaults):
    """--NAME-steps/cfg/shift/t-start/sampler; unset ones are the weights' defaults (their sampling.json,
    else the official values shown)."""
    title = "Stage C" if name == "prior" else "Stage B"
    p.add_argument(f"--{name}-steps", type=int, help=f"{title} steps (official {defaults.steps})")
    p.add_argument(f"--{name}-cfg", type=cfg_arg,
                   help=f"{title} guidance scale (official {defaults.cfg}); none: no guidance and no unconditional "
                        "pass (a consistency-distilled Stage C has its guidance built in)")
    p.add_argument(f"--{name}-shift", type=float, help=f"{title} schedule shift (official {defaults.shift})")
    p.add_argument(f"--{name}-t-start", type=float,
                   help=f"{title} first step's t, (0, 1] (official {defaults.t_start})")
    # --sampler is short for --prior-sampler: Stage C is the stage a consistency distillation makes few-step
    aliases = ["--sampler"] if name == "prior" else []
    p.add_argument(f"--{name}-sampler", *aliases, choices=["ddpm", "ddim", "lcm"],
                   help=f"official {defaults.sampler}" + ("; --sampler is the same" if aliases else ""))


NO_GUIDANCE = "none"


def cfg_arg(text):
    """A guidance scale, or "none" (no guidance: SamplerSettings cfg=None)."""
    if text.strip().lower() == NO_GUIDANCE:
        return NO_GUIDANCE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def rgb(text):
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"expected R,G,B with values 0-255, got {text!r}")
    return tuple(int(p) for p in parts)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["text2img", *IMAGE_MODES])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", action="append", help="weights folder, Hugging Face repository id, or \"demo\" "
                     "(the embedded 128x128 shapes cascade; the default) / \"demo-lcm\" (the demo distilled for "
                     "4+2 steps); repeat it to combine folders, each contributing what it holds (e.g. a Stage C and "
                     "a Stage B trainer's export)")
    src.add_argument("--random", choices=["tiny", "lite", "full"], help="random weights of this size (no download)")
    p.add_argument("--lite", action="store_true", help="use the lite Stage C/B weights from --weights")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="bfloat16 (default with --weights) or float32 (default with --random and the demo)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--long-prompts", action="store_true",
                   help="encode prompts past CLIP's 77 tokens in 75-token windows instead of truncating them")
    p.add_argument("--image", help="input image (variation, img2img, reconstruct)")
    p.add_argument("--background", type=rgb, default=(255, 255, 255),
                   help="R,G,B that transparent pixels of --image become (default white)")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how far to noise the image (0-1]")
    p.add_argument("--height", type=int, default=None, help="default 1024 (128 for the demo); img2img/reconstruct: the image's")
    p.add_argument("--width", type=int, default=None, help="default 1024 (128 for the demo); img2img/reconstruct: the image's")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="0 .. 2**32 - 1; image i gets seed + i")
    stage_args(p, "prior", PRIOR_DEFAULTS)
    stage_args(p, "decoder", DECODER_DEFAULTS)
    p.add_argument("--out", default="out", help="folder for the PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace earlier PNGs of the same names")
    p.add_argument("--preview", action="store_true", help="also save previewer images of the Stage C latents")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
    p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                   help="sample model-parallel on a device mesh, e.g. data=2,fsdp=4 or fsdp=4,tensor=2 (parameters "
                        "sharded over fsdp/tensor as in training; default: the batch split over all local devices)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="Stage C LoRA file (official or ComfyUI format), strength default 1 (finite, within "
                        "+-100); repeatable. A file named like x:2 is written x:2:1")
    p.add_argument("--plan", default=None, metavar="TOPOLOGY",
                   help="load nothing and generate nothing: compile the Stage C / Stage B loops and Stage A decode at "
                        "this size, batch (--num-images) and dtype for a TPU slice (v5e-1, v6e-1, v5p-8, v5e:2x2 ...; "
                        "needs the tpu extra) or cpu-N, and print whether the cascade fits and the estimated seconds "
                        "per image. Model sizes: --random SET, else the full (--lite: lite) release")
    p.add_argument("--margin", type=float, default=0.1, help="with --plan: share of each chip's HBM kept free")
    return p


def stage_changes(args, name) -> dict:
    """The stage's flags that were given, as SamplerSettings changes; an impossible value fails naming its
    flag (e.g. --prior-shift), checked against the official settings before any model loads."""
    changes = {k: getattr(args, f"{name}_{k}") for k in STAGE_FLAGS if getattr(args, f"{name}_{k}") is not None}
    if changes.get("cfg") == NO_GUIDANCE:
        changes["cfg"] = None
    try:
        (PRIOR_DEFAULTS if name == "prior" else DECODER_DEFAULTS).replace(**changes)
    except ValueError as e:
        raise ValueError(f"--{name}-{str(e).replace('t_start', 't-start')}") from None
    return changes


def resolve_settings(args, pipe):
    """args.prior / args.decoder: the pipeline's default SamplerSettings (its weights' sampling.json, else the
    official ones) with the given flags."""
    for name, base in (("prior", pipe.prior_defaults), ("decoder", pipe.decoder_defaults)):
        try:
            setattr(args, name, base.replace(**getattr(args, f"{name}_changes")))
        except ValueError as e:  # a flag that only conflicts with these weights' defaults
            raise ValueError(f"--{name}-{e} (with these weights' {name} defaults)") from None


def describe(settings, title: str) -> str:
    text = f"{title}: {settings.steps} steps, cfg {settings.cfg}, shift {settings.shift}, {settings.sampler}"
    return text + (f", t_start {settings.t_start}" if settings.t_start != 1.0 else "")


def validate(args):
    """Everything that can be checked without a model, in a second: raises ValueError with the flag's name."""
    if args.mode in IMAGE_MODES and not args.image:
        raise ValueError(f"{args.mode} needs --image")
    if args.mode == "img2img":
        try:
            checks.check_strength(args.strength)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    count = args.num_images if args.mode in ("text2img", "variation") else 1
    try:
        args.seeds = checks.seeds_for(args.seed, count)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    args.prior_changes, args.decoder_changes = stage_changes(args, "prior"), stage_changes(args, "decoder")
    try:
        check_lora_files(args.lora)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(str(e) if str(e).startswith("--lora") else f"--lora: {e}") from None
    if args.mesh is not None:
        try:
            parse_mesh_spec(args.mesh)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    args.image_array = load_image(args.image, args.background) if args.mode in IMAGE_MODES else None
    if args.weights is None and args.random is None:
        args.weights = demo.NAME
    elif args.weights is not None and len(args.weights) == 1:
        args.weights = args.weights[0]  # one folder: a plain path, as from_pretrained takes it
    if args.mode in ("text2img", "variation"):
        named = lookup(args.weights)
        default_h = default_w = named.image_size if named is not None and named.image_size else 1024
    else:  # the image's size unless given
        default_h, default_w = (round_size(side) for side in args.image_array.shape[:2])
    args.height = default_h if args.height is None else args.height
    args.width = default_w if args.width is None else args.width
    check_image_size(args.height, args.width)
    if args.plan is not None:
        return  # nothing is written
    check_output_dir(args.out)
    args.paths = output_paths(args.out, args.mode, args.seeds, overwrite=args.overwrite)
    args.preview_paths = output_paths(args.out, "preview", args.seeds, overwrite=args.overwrite)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        validate(args)
    except ValueError as e:
        p.error(str(e))
    return args


class ProgressBars:
    """One tqdm bar per stage, fed by the pipeline's per-step callback."""

    def __init__(self):
        self.bar = None

    def __call__(self, event):
        if event.step == 1:
            self.bar = tqdm(total=event.steps, desc=event.stage, unit="step", leave=True)
        self.bar.update(1)
        if event.step == event.steps:
            self.bar.close()


def run(args, pipe):
    common = dict(seed=args.seed, callback=None if args.no_progress else ProgressBars())
    size = dict(height=args.height, width=args.width)
    text = dict(long_prompts=args.long_prompts)
    if args.mode == "text2img":
        return pipe.text_to_image(args.prompt, args.negative_prompt, num_images_per_prompt=args.num_images,
                                  prior=args.prior, decoder=args.decoder, **size, **text, **common)
    if args.mode == "variation":
        return pipe.image_variation(args.image_array, prompt=args.prompt, num_images_per_prompt=args.num_images,
                                    prior=args.prior, decoder=args.decoder, **size, **text, **common)
    if args.mode == "img2img":
        return pipe.image_to_image(args.image_array, args.prompt, args.negative_prompt, strength=args.strength,
                                   prior=args.prior, decoder=args.decoder, **size, **text, **common)
    return pipe.reconstruct(args.image_array, prompt=args.prompt, decoder=args.decoder, **size, **common)


def metadata(args) -> dict:
    fields = ("steps", "cfg", "shift", "sampler", "t_start", "cfg_rho", "cfg_std_per_sample")
    stage = lambda s: {k: v for k, v in dataclasses.asdict(s).items() if k in fields}
    meta = {"mode": args.mode, "prompt": args.prompt, "negative_prompt": args.negative_prompt or "",
            "prior": stage(args.prior), "decoder": stage(args.decoder), "height": args.height, "width": args.width,
            "weights": args.weights or f"random:{args.random}", "dtype": args.dtype or "",
            "long_prompts": args.long_prompts, "loras": args.lora}
    return {**meta, "strength": args.strength} if args.mode == "img2img" else meta


def plan_command(args) -> int:
    """``--plan TOPOLOGY``: the sampling plan of these settings (JSON, then a summary); 1 if it does not fit."""
    import json

    from cascade_jax.accelerators import plan_target
    from cascade_jax.pipelines import PRIOR_DEFAULTS as prior, DECODER_DEFAULTS as decoder
    from cascade_jax.pipelines.loading import pipeline_set
    from cascade_jax.pipelines.plan import format_sampling, plan_sampling

    set_name = args.random or ("demo" if args.weights in (demo.NAME, demo.LCM_NAME) else "lite" if args.lite else "full")
    dtype = args.dtype or ("float32" if set_name in ("demo", "tiny") or args.random else "bfloat16")
    try:
        report = plan_sampling(pipeline_set(set_name), plan_target(args.plan), height=args.height, width=args.width,
                               batch=len(args.seeds), dtype=dtype, prior=prior.replace(**args.prior_changes),
                               decoder=decoder.replace(**args.decoder_changes), mesh=args.mesh, margin=args.margin)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"models": set_name, **report}, indent=1))
    print(format_sampling(report))
    return 0 if report["fits"] is not False else 1


def main(argv=None):
    args = parse_args(argv)
    if args.plan is not None:
        return plan_command(args)
    enable_compilation_cache()
    start = time.perf_counter()
    try:
        if args.random:
            print(f"Using RANDOM weights ({args.random} configuration): the images will be noise-like patterns, "
                  "not pictures. Pass --weights to use real Stable Cascade weights.")
            pipe = StableCascadePipeline.random(args.random, dtype=args.dtype or "float32", mesh=args.mesh)
        else:
            named = lookup(args.weights)
            default_dtype = named.dtype if named is not None else "bfloat16"
            pipe = StableCascadePipeline.from_pretrained(args.weights, lite=args.lite,
                                                         dtype=args.dtype or default_dtype, mesh=args.mesh)
        if args.lora:
            pipe.load_loras(args.lora)
            print("\n".join(applied.describe() for applied in pipe.loras))
        resolve_settings(args, pipe)
        print(f"models ready in {time.perf_counter() - start:.1f}s; running {args.mode} "
              f"({describe(args.prior, 'Stage C') + '; ' if args.mode != 'reconstruct' else ''}"
              f"{describe(args.decoder, 'Stage B')})")
        result = run(args, pipe)
        print(timing_report(result.timings))
        paths = save_images(args.paths, result.images, seeds=result.seeds, metadata=metadata(args))
        if args.preview:
            paths += save_images(args.preview_paths, pipe.preview(result.stage_c_latents), seeds=result.seeds,
                                 metadata=metadata(args))
    except (ValueError, OSError, FloatingPointError) as e:
        lora_hint = f" The LoRAs in use ({', '.join(args.lora)}) may overflow at these strengths: try lower ones." \
            if isinstance(e, FloatingPointError) and args.lora else ""
        print(f"error: {e}{lora_hint}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
