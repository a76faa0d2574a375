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
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app_parts import (ControlNetEntry, Done, Service, Update, check_upload, image_from_editor, mask_from_editor,
                       size_hint)
from cascade_jax import storage
from cascade_jax.diffusion.samplers import SAMPLERS
from cascade_jax.named_weights import lookup
from cascade_jax.pipelines import StableCascadePipeline
from cascade_jax.pipelines.sizes import MIN_SIZE

APP_CONTROLS = ("canny", "inpainting", "super_resolution")  # identity needs face detection (not included)
LORA_SLOTS = 3
SHARED = ["height", "width", "use_image_size", "num_images", "seed", "random_seed", "prior_steps", "prior_cfg",
          "prior_sampler", "decoder_steps", "decoder_cfg", "decoder_sampler",
          *[f"lora_{i}{part}" for i in range(1, LORA_SLOTS + 1) for part in ("", "_strength")]]


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


def load_pipeline(args):
    """(pipeline, generate.py's weight flags, a label); without --weights/--random the demo weights."""
    if args.random:
        print(f"Using RANDOM weights ({args.random} configuration): the images will be noise-like patterns.")
        pipe = StableCascadePipeline.random(args.random, dtype=args.dtype or "float32")
        return pipe, ["--random", args.random], f"random:{args.random}"
    source = args.weights or "demo"
    named = lookup(source)  # a named set (demo, demo-lcm) says its own dtype
    dtype = args.dtype or (named.dtype if named is not None else "bfloat16")
    try:
        pipe = StableCascadePipeline.from_pretrained(source, lite=args.lite, dtype=dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        if args.weights is None:
            raise SystemExit(f"error: the demo weights cannot be loaded from this install ({e}).\nPass --weights DIR "
                             "(converted or official Stable Cascade weights) or --random tiny.") from None
        raise SystemExit(f"error: {e}") from None
    flags = ["--weights", source, "--dtype", dtype] + (["--lite"] if args.lite else [])
    return pipe, flags, source


def find_loras(folder) -> dict:
    if folder is None:
        return {}
    if storage.is_url(folder):  # a bucket folder: the files are applied from their URLs (copied once)
        try:
            found = storage.glob(storage.join(folder, "*.safetensors"))
        except OSError as e:
            raise SystemExit(f"error: --lora {folder}: {e}") from None
        if not found:
            raise SystemExit(f"error: --lora {folder} holds no LoRA files (*.safetensors)")
        return {storage.name(url): url for url, _ in found}
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: --lora {folder} is not a folder of LoRA files")
    return {p.name: str(p) for p in sorted(folder.glob("*.safetensors"))}


def build_controlnets(specs, pipe, args) -> dict:
    from flax import nnx

    from cascade_jax.models.random_init import random_model
    from cascade_jax.pipelines.controlnet import ControlNetPipeline, load_controlnet, tiny_controlnet_config

    entries = {}
    for spec in specs:
        control, sep, source = spec.partition("=")
        if not sep:
            control, source = (None, spec) if spec != "random" else ("*", spec)
            control = control or Path(spec).stem
        controls = APP_CONTROLS if control == "*" else [control]
        if not set(controls) <= set(APP_CONTROLS):
            raise SystemExit(f"error: --controlnet {spec}: say which control it is, TYPE=FILE with TYPE one of "
                             f"{', '.join(APP_CONTROLS)}")
        for i, name in enumerate(controls):
            if source == "random":
                if args.random != "tiny":
                    raise SystemExit("error: --controlnet random needs --random tiny")
                stage_c = nnx.merge(pipe.prior.graphdef, pipe.prior.state)
                model = random_model("controlnet", tiny_controlnet_config(name, stage_c), seed=100 + i)
            else:
                try:
                    model = load_controlnet(source, name, args.dtype or "bfloat16")
                except (FileNotFoundError, ValueError, OSError) as e:
                    raise SystemExit(f"error: --controlnet {spec}: {e}") from None
            entries[name] = ControlNetEntry(ControlNetPipeline(pipe, model, name), source)
    return entries


# ---- the page --------------------------------------------------------------------------------------
def gradio():
    """gradio, imported where the page is built: only the app needs the `app` extra, not the other scripts."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the app itself
    try:
        import gradio as gr
    except ModuleNotFoundError:
        raise SystemExit("error: the app needs gradio: pip install -e '.[app]'") from None
    return gr


def _preview_for_page(image: np.ndarray) -> np.ndarray:
    scale = max(1, 192 // image.shape[0])  # a 3x3 demo latent previews as 24x24 pixels: show it larger
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def page_updates(events, progress):
    """Service events -> (preview, status, gallery, files) updates; a bad request becomes gr.Error."""
    gr = gradio()
    try:
        yield None, "Checking the request...", None, None
        for event in events:
            if isinstance(event, Update):
                if event.step is not None:
                    progress(event.step, desc=event.stage, unit="steps")
                preview = gr.skip() if event.preview is None else _preview_for_page(event.preview)
                yield preview, event.status, gr.skip(), gr.skip()
            elif isinstance(event, Done):
                images = [str(p) for p in event.paths]
                yield gr.skip(), event.status, images, images
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
        raise gr.Error(str(e), print_exception=False) from None


def endpoint(names: list[str], run):
    """A gradio handler with named parameters (the API's parameter names) that reports progress: gradio
    finds the gr.Progress default of the last parameter and passes the tracker there."""
    gr = gradio()
    def handler(*values):
        *values, progress = values
        yield from page_updates(run(dict(zip(names, values))), progress)
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        + [inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())])
    return handler


def shared_controls(service: Service, size: int, steps: tuple[int, int]) -> dict:
    gr = gradio()
    c = {}
    with gr.Accordion("Size, seed and sampling", open=True):
        with gr.Row():
            c["height"] = gr.Number(size, label="Height", precision=0, minimum=8)
            c["width"] = gr.Number(size, label="Width", precision=0, minimum=8)
            c["use_image_size"] = gr.Checkbox(True, label="Image modes: use the input image's size")
        hint = gr.Markdown(size_hint(size, size))
        with gr.Row():
            c["num_images"] = gr.Slider(1, service.max_images, 1, step=1, label="Number of images")
            c["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0)
            c["random_seed"] = gr.Checkbox(False, label="Random seed")
        for stage, title, defaults, n in (("prior", "Stage C", service.pipe.prior_defaults, steps[0]),
                                          ("decoder", "Stage B", service.pipe.decoder_defaults, steps[1])):
            with gr.Row():  # the weights' defaults (their sampling.json, else the official settings)
                c[f"{stage}_steps"] = gr.Number(n or defaults.steps, label=f"{title} steps", precision=0, minimum=1)
                c[f"{stage}_cfg"] = gr.Number(defaults.cfg, label=f"{title} guidance")
                c[f"{stage}_sampler"] = gr.Dropdown(list(SAMPLERS), value=defaults.sampler, label=f"{title} sampler")
    with gr.Accordion("LoRA (Stage C)", open=False, visible=bool(service.loras)):
        for i in range(1, LORA_SLOTS + 1):
            with gr.Row():
                c[f"lora_{i}"] = gr.Dropdown(["", *service.loras], value="", label=f"LoRA {i}")
                c[f"lora_{i}_strength"] = gr.Slider(-2, 2, 1.0, step=0.05, label="strength")
    for field in ("height", "width"):
        c[field].change(size_hint, [c["height"], c["width"]], hint, queue=False, api_visibility="private")
    return c


def checked_upload(component, service: Service):
    """``component`` with each upload checked before gradio decodes it (``check_upload``): gradio would decode
    an image of any size, and its errors for a file that is not an image show the server's cache path."""
    gr = gradio()
    preprocess = component.preprocess

    def checked(payload):
        try:
            check_upload(payload, service.upload_pixels, service.upload_ttl_min)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError):  # PIL's errors for data that is not a readable image
            raise gr.Error("the uploaded file cannot be read as an image (PNG, JPEG, WebP, ...)",
                           print_exception=False) from None

    component.preprocess = checked  # gradio calls the component's preprocess for each request
    return component


def build_page(service: Service, size: int, steps: tuple[int, int]):
    gr = gradio()
    # Uploads (gradio's cache) older than the upload TTL are deleted, looked for every quarter of it.
    ttl_s = None if service.upload_ttl_min is None else max(int(service.upload_ttl_min * 60), 1)
    delete_cache = None if ttl_s is None else (max(ttl_s // 4, 1), ttl_s)
    with gr.Blocks(title="Stable Cascade (JAX)", delete_cache=delete_cache) as page:
        gr.Markdown(f"## Stable Cascade in JAX\nWeights: `{service.weights_label}`. One request runs at a time; "
                    f"at most {service.max_images} images per request, {service.max_side} pixels a side.")
        outputs = [gr.Image(label="Stage C preview", interactive=False, format="png", height=192, render=False),
                   gr.Markdown("Ready.", label="status", elem_id="status", render=False),
                   gr.Gallery(label="Results", format="png", columns=2, interactive=False, elem_id="gallery",
                              render=False),
                   gr.File(label="Downloads (PNG with prompt, seed and settings)", file_count="multiple",
                           interactive=False, render=False)]
        with gr.Row():
            with gr.Column():
                buttons = mode_tabs(service)
                controls = shared_controls(service, size, steps)
                for button, (api_name, names, inputs, run) in buttons:
                    button.click(endpoint(names + SHARED, run), inputs + [controls[n] for n in SHARED], outputs,
                                 api_name=api_name, concurrency_id="device", concurrency_limit=1)
            with gr.Column():
                for component in outputs:
                    component.render()
    return page


def mode_tabs(service: Service) -> list:
    """One tab per mode: [(its Generate button, (api name, parameter names, inputs, run))]; each button
    also sends the shared controls."""
    gr = gradio()
    buttons = []

    def button(label, api_name, names, inputs, run):
        buttons.append((gr.Button(label, variant="primary", elem_id=api_name), (api_name, names, inputs, run)))

    with gr.Tab("Text to image"):
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt")
        button("Generate", "text_to_image", ["prompt", "negative_prompt"], [prompt, negative],
               lambda f: service.run("text2img", f))
    with gr.Tab("Image variation"):
        image = checked_upload(gr.Image(label="Image", type="filepath", image_mode=None), service)
        prompt = gr.Textbox(label="Prompt (optional)")
        button("Make variations", "image_variation", ["image", "prompt"], [image, prompt],
               lambda f: service.run("variation", f))
    with gr.Tab("Image to image"):
        image = checked_upload(gr.Image(label="Image", type="filepath", image_mode=None), service)
        prompt = gr.Textbox(label="Prompt")
        negative = gr.Textbox(label="Negative prompt")
        strength = gr.Slider(0.05, 1.0, 0.8, step=0.05, label="Strength (how far from the image)")
        button("Generate", "image_to_image", ["image", "prompt", "negative_prompt", "strength"],
               [image, prompt, negative, strength], lambda f: service.run("img2img", f))
    with gr.Tab("Reconstruction"):
        image = checked_upload(gr.Image(label="Image", type="filepath", image_mode=None), service)
        button("Reconstruct", "reconstruct", ["image"], [image], lambda f: service.run("reconstruct", f))
    with gr.Tab("ControlNet", visible=bool(service.controlnets)):
        gr.Markdown("One image per request, at the image's size (or the size set below), with the Stage C / B "
                    "steps and the seed set below; guidance is the official one of each control.")
        control = gr.Dropdown(sorted(service.controlnets), value=min(service.controlnets, default=None),
                              label="Control")
        editor = checked_upload(gr.ImageMask(label="Control image (inpainting: paint the area to regenerate)",
                                             type="numpy"), service)
        prompt = gr.Textbox(label="Prompt")
        negative = gr.Textbox(label="Negative prompt")
        strength = gr.Slider(0, 2, 1.0, step=0.05, label="Control strength")

        def run_controlnet(f):
            editor_value = f.pop("editor")
            mask = mask_from_editor(editor_value) if f["control"] == "inpainting" else None
            if f["control"] == "inpainting" and mask is None:
                raise ValueError("inpainting: paint the area to regenerate on the control image")
            return service.run_controlnet(f, image_from_editor(editor_value), mask)

        button("Generate", "controlnet", ["control", "editor", "prompt", "negative_prompt", "control_strength"],
               [control, editor, prompt, negative, strength], run_controlnet)
    return buttons


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
    pipe, source_argv, label = load_pipeline(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="cascade-app-"))
    out.mkdir(parents=True, exist_ok=True)
    small = args.random == "tiny" or label == "demo"
    size = args.size or (128 if small else 1024)
    service = Service(pipe, source_argv=source_argv, out_dir=out, max_images=args.max_images,
                      loras=find_loras(args.lora), controlnets=build_controlnets(args.controlnet, pipe, args),
                      weights_label=label, max_side=args.max_side or 2 * size,
                      upload_pixels=int(args.max_upload_mp * 1e6), upload_ttl_min=args.upload_ttl)
    page = build_page(service, size, (args.prior_steps, args.decoder_steps))
    page.queue(max_size=args.queue_size, default_concurrency_limit=1)
    print(f"models ready in {time.perf_counter() - start:.1f}s; results go to {out}", flush=True)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out)], ssr_mode=False,
                show_error=True, quiet=False, max_file_size=f"{args.max_upload_mb}mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
