"""The app's page (gradio): one tab per mode, the shared size/seed/sampling/LoRA controls, and the
service's events as the page's preview, status, gallery and downloads. gradio is imported only here,
when the page is built (the ``app`` extra)."""

from __future__ import annotations

import inspect
import os

import numpy as np

from cascade_jax.app.fields import image_from_editor, mask_from_editor, size_hint
from cascade_jax.app.service import Done, Service, Update
from cascade_jax.app.uploads import check_upload
from cascade_jax.diffusion.samplers import SAMPLERS

LORA_SLOTS = 3
SHARED = ["height", "width", "use_image_size", "num_images", "seed", "random_seed", "prior_steps", "prior_cfg",
          "prior_sampler", "decoder_steps", "decoder_cfg", "decoder_sampler",
          *[f"lora_{i}{part}" for i in range(1, LORA_SLOTS + 1) for part in ("", "_strength")]]


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
