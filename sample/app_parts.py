"""The web app's work apart from its page (sample/app.py): one shared pipeline, one request at a
time on the device, per-step progress with Stage C previews, and results written as
sample/generate.py writes them. No gradio here: the page turns these events into its widgets.

A request is checked by generate.py's own argument checks (the same messages as the command line,
e.g. the nearest valid size), run by generate.py's ``run`` with this request's progress callback,
and saved with generate.py's PNG metadata, in a folder of its own so that concurrent requests
never pick the same file names.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import queue
import secrets
import sys
import threading
import time
from pathlib import Path

import numpy as np

from cascade_jax.pipelines.controlnet import output_size
from cascade_jax.pipelines.images import open_checked
from cascade_jax.pipelines.outputs import save_images, timing_report
from cascade_jax.pipelines.sizes import (check_image_size, check_size_limit, nearest_valid, stage_b_latent_hw,
                                         stage_c_latent_hw)
from cascade_jax.pipelines.stage_runner import SEED_LIMIT, program_settings

HERE = Path(__file__).resolve().parent
MODE_METHODS = ("text_to_image", "image_variation", "image_to_image", "reconstruct")
PREVIEW_EVERY_S = 0.25  # at most this often a Stage C preview (and always after its last step)


def load_script(name: str):
    """sample/NAME.py as a module (the scripts are not a package)."""
    module_name = f"cascade_sample_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


generate = load_script("generate")
controlnet_script = load_script("controlnet")


@dataclasses.dataclass
class Update:
    """Work in progress: a status line, the running stage's (step, steps), and maybe a preview."""

    status: str
    step: tuple[int, int] | None = None
    stage: str | None = None
    preview: np.ndarray | None = None


@dataclasses.dataclass
class Done:
    paths: list
    status: str


def size_hint(height, width) -> str:
    """What the page says under the size fields: the latent sizes, or the nearest valid size."""
    try:
        height, width = int(height), int(width)
        check_image_size(height, width)
    except (TypeError, ValueError):
        try:
            return f"Not a valid size: the nearest valid size is {nearest_valid(int(height))}x{nearest_valid(int(width))}."
        except (TypeError, ValueError):
            return "Height and width must be whole numbers of pixels."
    (hc, wc), (hb, wb) = stage_c_latent_hw(height, width), stage_b_latent_hw(height, width)
    return f"{height}x{width}: Stage C latent {hc}x{wc}, Stage B latent {hb}x{wb}."


def pick_seed(seed, random_seed: bool, count: int) -> int:
    if random_seed:
        return secrets.randbelow(SEED_LIMIT - count + 1)
    if seed is None or float(seed) != int(float(seed)):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    return int(float(seed))


class _ProgressPipe:
    """The pipeline as generate.run calls it, with this request's progress callback (and Stage C x0
    for previews) in place of the command line's progress bars."""

    def __init__(self, pipe, callback, with_x0: bool):
        self._pipe, self._callback, self._with_x0 = pipe, callback, with_x0

    def __getattr__(self, name):
        attr = getattr(self._pipe, name)
        if name not in MODE_METHODS:
            return attr

        def call(*args, **kwargs):
            return attr(*args, **{**kwargs, "callback": self._callback, "callback_x0": self._with_x0})
        return call


class Service:
    """One pipeline shared by every user; device work runs one request at a time under ``lock``."""

    def __init__(self, pipe, *, source_argv: list[str], out_dir, max_images: int = 4, loras: dict | None = None,
                 controlnets: dict | None = None, weights_label: str = "", max_side: int = 2048,
                 upload_pixels: int = 24_000_000, upload_ttl_min: float | None = None):
        self.pipe, self.source_argv, self.out_dir = pipe, list(source_argv), Path(out_dir)
        self.max_images, self.loras, self.controlnets = max_images, dict(loras or {}), dict(controlnets or {})
        self.weights_label, self.max_side = weights_label, max_side
        self.upload_pixels, self.upload_ttl_min = upload_pixels, upload_ttl_min  # see check_upload
        self.lock = threading.Lock()
        self.active_loras: list[str] = []
        self.seen: set = set()  # shapes and settings compiled already (what the status calls "compiling")

    # ---- arguments -----------------------------------------------------------------------------
    def request_dir(self) -> Path:
        """A new folder name per request (created when its results are written). The results are served by
        their paths, so the name is unguessable: 64 random bits after the time."""
        return self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}"

    def check_size(self, height: int, width: int, from_image: bool):
        """This server's cap on the image side (``--max-side``): every new size compiles programs that stay in
        memory, and the work grows with the pixels, all while the device is held."""
        try:
            check_size_limit(height, width, self.max_side, "this server's --max-side")
        except ValueError as e:
            hint = "; untick \"use the input image's size\" and set a size, or upload a smaller image" \
                if from_image else ""
            raise ValueError(f"{e}{hint}") from None

    def lora_specs(self, fields: dict) -> list[str]:
        specs = []
        for i in itertools.count(1):
            if f"lora_{i}" not in fields:
                return specs
            name, strength = fields[f"lora_{i}"], fields.get(f"lora_{i}_strength", 1.0)
            if name:
                if name not in self.loras:
                    raise ValueError(f"unknown LoRA {name!r}; available: {sorted(self.loras) or 'none'}")
                specs.append(f"{self.loras[name]}:{float(strength):g}")

    def generate_args(self, mode: str, fields: dict) -> argparse.Namespace:
        """generate.py's parsed and checked arguments for this request (ValueError: the CLI's message)."""
        count = int(fields.get("num_images") or 1) if mode in ("text2img", "variation") else 1
        if count > self.max_images:
            raise ValueError(f"at most {self.max_images} images per request (this server's --max-images), "
                             f"got {count}")
        argv = [mode, *self.source_argv, f"--prompt={fields.get('prompt') or ''}", "--no-progress",
                f"--num-images={count}", f"--seed={pick_seed(fields.get('seed'), fields.get('random_seed'), count)}",
                f"--out={self.request_dir()}"]
        if fields.get("negative_prompt"):
            argv.append(f"--negative-prompt={fields['negative_prompt']}")
        if fields.get("image"):
            argv.append(f"--image={fields['image']}")
        elif mode in generate.IMAGE_MODES:
            raise ValueError(f"{mode} needs an input image: upload one")
        if mode == "img2img":
            argv.append(f"--strength={float(fields.get('strength', 0.8))}")
        if not (mode in generate.IMAGE_MODES and fields.get("use_image_size")):
            argv += [f"--height={_whole(fields.get('height'), 'height')}",
                     f"--width={_whole(fields.get('width'), 'width')}"]
        for stage in ("prior", "decoder"):
            for key in ("steps", "cfg", "sampler"):
                if fields.get(f"{stage}_{key}") not in (None, ""):
                    value = fields[f"{stage}_{key}"]
                    value = _whole(value, f"{stage} steps") if key == "steps" else value
                    argv.append(f"--{stage}-{key}={value}")
        argv += [f"--lora={spec}" for spec in self.lora_specs(fields)]
        args = generate.build_parser().parse_args(argv)
        generate.validate(args)
        generate.resolve_settings(args, self.pipe)
        self.check_size(args.height, args.width, mode in generate.IMAGE_MODES and bool(fields.get("use_image_size")))
        return args

    def prompt_notes(self, prompt: str, negative_prompt: str | None = None) -> str:
        """The text encoder's notes on prompts it truncates (the server log's warning), for the page."""
        named = [(p, n) for p, n in ((prompt, "the prompt"), (negative_prompt, "the negative prompt")) if p]
        notes = self.pipe.text.truncation_notes([p for p, _ in named], [n for _, n in named]) if named else []
        return "".join(f"\n\nNote: {note}" for note in notes)

    # ---- running -------------------------------------------------------------------------------
    def run(self, mode: str, fields: dict):
        """Yield ``Update``s while the request runs, then one ``Done``; errors raise with the pipeline's message."""
        args = self.generate_args(mode, fields)
        stages = ["Stage B"] if mode == "reconstruct" else ["Stage C", "Stage B"]
        keys = {"Stage C": (mode, args.height, args.width, len(args.seeds), program_settings(args.prior),
                            args.strength),
                "Stage B": (args.height, args.width, len(args.seeds), program_settings(args.decoder))}

        def work(callback):
            if args.lora != self.active_loras:
                # Merged into Stage C's weights: the shapes stay, so its compiled programs are reused.
                self.pipe.load_loras(args.lora)
                self.active_loras = list(args.lora)
            notes = self.prompt_notes(args.prompt, args.negative_prompt)  # with the LoRAs' new tokens
            return generate.run(args, _ProgressPipe(self.pipe, callback, self.pipe.previewer is not None)), notes

        result, notes = yield from self._stream(work, stages, keys, f"{args.height}x{args.width}")
        paths = save_images(args.paths, result.images, seeds=result.seeds, metadata=generate.metadata(args))
        yield Done(paths, self._summary(result, stages, keys) + notes)

    def _summary(self, result, stages, keys) -> str:
        self.seen.update(keys[s] for s in stages)
        seeds = ", ".join(str(s) for s in result.seeds)
        return f"Done: {len(result.seeds)} image(s), seed(s) {seeds}.\n\n" + timing_report(result.timings).replace(
            "\n", "  \n")

    def _start_text(self, stage: str, keys: dict, label: str) -> str:
        if keys.get(stage) in self.seen:
            return f"{stage}: starting..."
        return f"{stage}: compiling for {label} (first request of this size and settings; later ones reuse it)..."

    def _stream(self, work, stages, keys, label: str):
        """Run ``work(callback)`` on a worker thread under the device lock, yielding its progress. ``label``
        names the size in the stages' status lines; without ``stages`` it is the whole start message."""
        events: queue.Queue = queue.Queue()
        outcome: dict = {}

        def target():
            with self.lock:
                events.put("started")
                try:
                    outcome["value"] = work(events.put)
                except Exception as e:  # noqa: BLE001 - handed to the request's own thread below
                    outcome["error"] = e
            events.put("finished")

        if self.lock.locked():
            yield Update("Waiting for the device: another request is running...")
        worker = threading.Thread(target=target, name="cascade-request", daemon=True)
        worker.start()
        try:
            yield from self._progress(events, stages, keys, label)
        finally:
            worker.join()  # the device lock is held until the work ends, even if the page went away
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _progress(self, events: queue.Queue, stages, keys, label: str):
        last_preview = 0.0
        while (item := events.get()) != "finished":
            if item == "started":
                yield Update(self._start_text(stages[0], keys, label), stage=stages[0]) if stages else Update(label)
                continue
            status = f"{item.stage}: step {item.step}/{item.steps}"
            preview = None
            if item.stage == "Stage C" and item.x0 is not None and (
                    item.step == item.steps or time.monotonic() - last_preview > PREVIEW_EVERY_S):
                preview = np.concatenate(list(self.pipe.preview(item.x0)), axis=1)  # the batch side by side
                last_preview = time.monotonic()
            yield Update(status, (item.step, item.steps), item.stage, preview)
            index = stages.index(item.stage)
            if item.step == item.steps and index + 1 < len(stages):
                yield Update(self._start_text(stages[index + 1], keys, label), stage=stages[index + 1])

    # ---- ControlNet ----------------------------------------------------------------------------
    def controlnet_args(self, fields: dict, image: np.ndarray, mask: np.ndarray | None) -> argparse.Namespace:
        """sample/controlnet.py's checked arguments, with the uploaded image (and mask) as pixels: nothing is
        written before the results (no folder is left by a request that fails)."""
        control = fields.get("control")
        if control not in self.controlnets:
            raise ValueError(f"no ControlNet for {control!r} on this server; available: {sorted(self.controlnets)}")
        folder = self.request_dir()
        strength = float(fields.get("control_strength", 1.0))
        args = argparse.Namespace(
            control=control, weights=None, random=None, controlnet=self.controlnets[control].source,
            image=None, image_array=image, mask=None, mask_array=mask, saliency=None, mask_threshold=0.2,
            outpaint=False, faces=None, prompt=fields.get("prompt") or "",
            negative_prompt=fields.get("negative_prompt") or None, height=None, width=None,
            seed=pick_seed(fields.get("seed"), fields.get("random_seed"), 1), strength=strength, control_start=0,
            control_stop=None, t_start=1.0, no_keep_unmasked=False,
            prior_steps=_whole(fields.get("prior_steps"), "prior steps"), prior_cfg=None,
            decoder_steps=_whole(fields.get("decoder_steps"), "decoder steps"), out=str(folder))
        if not fields.get("use_image_size"):
            args.height, args.width = _whole(fields.get("height"), "height"), _whole(fields.get("width"), "width")
        controlnet_script.check_inputs(args)
        self.check_size(*output_size(control, image.shape[:2], args.height, args.width), args.height is None)
        return args

    def run_controlnet(self, fields: dict, image: np.ndarray, mask: np.ndarray | None):
        """As ``run``, for the ControlNet tab (the ControlNet pipeline reports no per-step progress)."""
        if image is None:
            raise ValueError("ControlNet needs a control image: upload one")
        args = self.controlnet_args(fields, image, mask)
        entry = self.controlnets[args.control]
        key = ("controlnet", args.control, args.height, args.width, args.prior_steps, args.decoder_steps)
        first = "compiling (first request of this size and settings; later ones reuse it), then sampling" \
            if key not in self.seen else "sampling"

        def work(callback):
            del callback  # ControlNetPipeline takes no progress callback
            return controlnet_script.run(args, entry.pipeline), self.prompt_notes(args.prompt, args.negative_prompt)

        start = f"ControlNet {args.control}: {first} (this mode reports no per-step progress)..."
        (result, prior, decoder), notes = yield from self._stream(work, [], {}, start)
        meta = {"mode": f"controlnet:{args.control}", "prompt": args.prompt,
                "negative_prompt": args.negative_prompt or "", "control": {"strength": args.strength},
                "prior": {"steps": prior.steps, "cfg": prior.cfg, "shift": prior.shift},
                "decoder": {"steps": decoder.steps, "cfg": decoder.cfg, "shift": decoder.shift},
                "weights": self.weights_label, "controlnet": str(entry.source)}
        paths = save_images(args.paths, result.images, seeds=result.seeds, metadata=meta)
        paths += save_images(args.control_paths, result.control_images, seeds=result.seeds, metadata=meta)
        self.seen.add(key)
        yield Done(paths, f"Done: seed {result.seeds[0]}.  \n" + timing_report(result.timings).replace("\n", "  \n")
                   + notes)


@dataclasses.dataclass
class ControlNetEntry:
    pipeline: object  # a ControlNetPipeline sharing the app's cascade
    source: str  # the weights it came from ("random" for random weights)


def _whole(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def mask_from_editor(value) -> np.ndarray | None:
    """A drawn mask (gradio's ImageMask value: background + layers) as a uint8 image, white = painted."""
    layers = [np.asarray(layer) for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    painted = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        painted |= (layer[..., 3] > 0) if layer.ndim == 3 and layer.shape[-1] == 4 else (layer.max(axis=-1) > 0)
    return painted.astype(np.uint8) * 255 if painted.any() else None


def image_from_editor(value) -> np.ndarray | None:
    background = (value or {}).get("background")
    if background is None:
        return None
    background = np.asarray(background)
    return background[..., :3].copy() if background.ndim == 3 else np.repeat(background[..., None], 3, axis=-1)


# ---- uploads ---------------------------------------------------------------------------------------
def upload_sources(payload) -> list[tuple[str, object]]:
    """(name shown to the user, path or bytes) of each image in an upload: gradio's image data (a file with
    ``path`` and ``orig_name``) or its image editor's (``background``, ``layers``, ``composite``)."""
    if payload is None:
        return []
    parts = [payload.background, payload.composite, *(payload.layers or [])] if hasattr(payload, "background") \
        else [payload]
    sources = []
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            sources.append(("the drawn image", part))
        elif part is not None and getattr(part, "path", None):
            sources.append((getattr(part, "orig_name", None) or "the image", part.path))
    return sources


def check_upload(payload, max_pixels: int, ttl_min: float | None = None):
    """Refuse an upload that is not an image, or has more than ``max_pixels``, from its header alone (before
    gradio decodes it), with a message that names the user's file, never the server's cache path."""
    for name, source in upload_sources(payload):
        if not isinstance(source, (bytes, bytearray, memoryview)) and not Path(source).is_file():
            kept = f" (uploads are deleted after {ttl_min:g} minutes)" if ttl_min else ""
            raise ValueError(f"the uploaded image {name} is no longer on this server{kept}: upload it again")
        with open_checked(source, f"the uploaded file {name}", max_pixels):
            pass
