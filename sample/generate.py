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
import json
import sys
import time

from tqdm import tqdm

from cascade_jax import demo
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline
from cascade_jax.pipelines.outputs import check_output_dir, output_paths, save_images, timing_report
from cascade_jax.pipelines.request import MODES, STAGE_KEYS, CheckedRequest, SamplingRequest
from cascade_jax.pipelines.sources import default_dtype, default_size
from cascade_jax.sharding import parse_mesh_spec
from cascade_jax.weights.cache import enable_compilation_cache

def stage_args(p, name, defaults):
    """--NAME-steps/cfg/shift/t-start/sampler/cfg-t-start/cfg-t-stop; unset ones are the weights' defaults
    (their sampling.json, else the official values shown)."""
    title = "Stage C" if name == "prior" else "Stage B"
    p.add_argument(f"--{name}-steps", type=int, help=f"{title} steps (official {defaults.steps})")
    p.add_argument(f"--{name}-cfg", type=cfg_arg,
                   help=f"{title} guidance scale (official {defaults.cfg}); none: no guidance and no unconditional "
                        "pass (a consistency-distilled Stage C has its guidance built in)")
    p.add_argument(f"--{name}-shift", type=float, help=f"{title} schedule shift (official {defaults.shift})")
    p.add_argument(f"--{name}-t-start", type=float,
                   help=f"{title} first step's t, (0, 1] (official {defaults.t_start})")
    p.add_argument(f"--{name}-cfg-t-start", type=float,
                   help=f"{title} guidance only on steps from t <= this, [0, 1] (official: every step)")
    p.add_argument(f"--{name}-cfg-t-stop", type=float,
                   help=f"{title} guidance only on steps from t >= this, [0, 1] (official: every step); the others "
                        "run the conditional pass alone")
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


DEFAULTS = SamplingRequest("text2img")  # the request's defaults are the flags'


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=MODES)
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
    p.add_argument("--background", type=rgb, default=DEFAULTS.background,
                   help="R,G,B that transparent pixels of --image become (default white)")
    p.add_argument("--strength", type=float, default=DEFAULTS.strength,
                   help="img2img: how far to noise the image (0-1]")
    p.add_argument("--height", type=int, default=None, help="default 1024 (128 for the demo); img2img/reconstruct: the image's")
    p.add_argument("--width", type=int, default=None, help="default 1024 (128 for the demo); img2img/reconstruct: the image's")
    p.add_argument("--num-images", type=int, default=DEFAULTS.num_images)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="0 .. 2**32 - 1; image i gets seed + i")
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
    """The stage's flags that were given, as SamplerSettings changes ("none" guidance: cfg None)."""
    changes = {k: getattr(args, f"{name}_{k}") for k in STAGE_KEYS if getattr(args, f"{name}_{k}") is not None}
    return {**changes, "cfg": None} if changes.get("cfg") == NO_GUIDANCE else changes


def weights_of(args):
    """The weights to load: the --weights given (one folder as a plain path, as from_pretrained takes it), the
    embedded demo without --weights and --random, None with --random."""
    if args.random is not None:
        return None
    if args.weights is None:
        return demo.NAME
    return args.weights[0] if len(args.weights) == 1 else args.weights


def request_of(args) -> SamplingRequest:
    """The command line's request (its flags are the request's fields)."""
    return SamplingRequest(args.mode, prompt=args.prompt, negative_prompt=args.negative_prompt,
                           long_prompts=args.long_prompts, image=args.image, background=args.background,
                           strength=args.strength, height=args.height, width=args.width, num_images=args.num_images,
                           seed=args.seed, prior=stage_changes(args, "prior"),
                           decoder=stage_changes(args, "decoder"), loras=tuple(args.lora))


@dataclasses.dataclass(frozen=True)
class Run:
    """A parsed and checked command line: the arguments as given, the weights to load, the checked request and
    the result paths (None with --plan: nothing is written)."""

    args: argparse.Namespace
    weights: str | list | None
    checked: CheckedRequest
    paths: list | None = None
    preview_paths: list | None = None


def parse_args(argv=None) -> Run:
    """Everything that can be checked without a model, in a second; a bad value exits 2 naming its flag."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.mesh is not None:
            try:
                parse_mesh_spec(args.mesh)
            except ValueError as e:
                raise ValueError(f"--{e}") from None
        weights = weights_of(args)
        checked = request_of(args).check(default_size(weights))
        if args.plan is not None:
            return Run(args, weights, checked)
        check_output_dir(args.out)
        paths, preview_paths = (output_paths(args.out, prefix, checked.seeds, overwrite=args.overwrite)
                                for prefix in (args.mode, "preview"))
    except ValueError as e:
        p.error(str(e))
    return Run(args, weights, checked, paths, preview_paths)


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


def plan_command(run: Run) -> int:
    """``--plan TOPOLOGY``: the sampling plan of these settings (JSON, then a summary); 1 if it does not fit."""
    from cascade_jax.accelerators import plan_target
    from cascade_jax.pipelines.loading import pipeline_set
    from cascade_jax.pipelines.plan import format_sampling, plan_sampling

    args, request = run.args, run.checked.request
    set_name = args.random or ("demo" if run.weights in (demo.NAME, demo.LCM_NAME) else "lite" if args.lite else "full")
    dtype = args.dtype or ("float32" if set_name in ("demo", "tiny") or args.random else "bfloat16")
    prior, decoder = run.checked.official_settings()
    try:
        report = plan_sampling(pipeline_set(set_name), plan_target(args.plan), height=request.height,
                               width=request.width, batch=len(run.checked.seeds), dtype=dtype, prior=prior,
                               decoder=decoder, mesh=args.mesh, margin=args.margin)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"models": set_name, **report}, indent=1))
    print(format_sampling(report))
    return 0 if report["fits"] is not False else 1


def load_pipeline(run: Run):
    """The pipeline of --random or the weights (a named set, e.g. the demo, in its own dtype)."""
    args = run.args
    if args.random:
        print(f"Using RANDOM weights ({args.random} configuration): the images will be noise-like patterns, "
              "not pictures. Pass --weights to use real Stable Cascade weights.")
        return StableCascadePipeline.random(args.random, dtype=args.dtype or "float32", mesh=args.mesh)
    return StableCascadePipeline.from_pretrained(run.weights, lite=args.lite,
                                                 dtype=args.dtype or default_dtype(run.weights), mesh=args.mesh)


def main(argv=None):
    run = parse_args(argv)
    args, checked = run.args, run.checked
    if args.plan is not None:
        return plan_command(run)
    enable_compilation_cache()
    start = time.perf_counter()
    try:
        pipe = load_pipeline(run)
        if args.lora:
            pipe.load_loras(args.lora)
            print("\n".join(applied.describe() for applied in pipe.loras))
        settings = checked.settings(pipe)
        print(f"models ready in {time.perf_counter() - start:.1f}s; running {args.mode} ({checked.describe(settings)})")
        result = checked.run(pipe, settings, callback=None if args.no_progress else ProgressBars())
        print(timing_report(result.timings))
        meta = checked.metadata(settings, weights=run.weights or f"random:{args.random}", dtype=args.dtype or "")
        paths = save_images(run.paths, result.images, seeds=result.seeds, metadata=meta)
        if args.preview:
            paths += save_images(run.preview_paths, pipe.preview(result.stage_c_latents), seeds=result.seeds,
                                 metadata=meta)
    except (ValueError, OSError, FloatingPointError) as e:
        lora_hint = f" The LoRAs in use ({', '.join(args.lora)}) may overflow at these strengths: try lower ones." \
            if isinstance(e, FloatingPointError) and args.lora else ""
        print(f"error: {e}{lora_hint}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
