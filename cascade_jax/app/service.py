"""The web app's work apart from its page: one shared pipeline, one request at a time on the device,
per-step progress with Stage C previews, and results written as ``sample/generate.py`` writes them.
No gradio here: the page (``app.page``) turns these events into its widgets.

A request is a :class:`~cascade_jax.pipelines.request.SamplingRequest` (or a ControlNet request) built
from the page's fields, checked by the same code and with the same messages as the command line (e.g.
the nearest valid size), run with this request's progress callback, and saved with the same PNG
metadata, in a folder of its own so that concurrent requests never pick the same file names.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import secrets
import threading
import time
from pathlib import Path

import numpy as np

from cascade_jax.app import fields as page_fields
from cascade_jax.pipelines.outputs import check_output_dir, output_paths, save_images, timing_report
from cascade_jax.pipelines.request import IMAGE_MODES, CheckedRequest, StageSettings
from cascade_jax.pipelines.sizes import check_size_limit
from cascade_jax.pipelines.stage_runner import program_settings

PREVIEW_EVERY_S = 0.25  # at most this often a Stage C preview (and always after its last step)


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


@dataclasses.dataclass
class ControlNetEntry:
    pipeline: object  # a ControlNetPipeline sharing the app's cascade
    source: str  # the weights it came from ("random" for random weights)


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked request of this server: the request, its settings on this pipeline and its result paths."""

    checked: CheckedRequest
    settings: StageSettings
    paths: list


class Service:
    """One pipeline shared by every user; device work runs one request at a time under ``lock``.
    ``weights_label`` and ``dtype`` are what the result PNGs name as their weights and dtype."""

    def __init__(self, pipe, *, out_dir, weights_label: str = "", dtype: str = "", max_images: int = 4,
                 loras: dict | None = None, controlnets: dict | None = None, max_side: int = 2048,
                 upload_pixels: int = 24_000_000, upload_ttl_min: float | None = None):
        self.pipe, self.out_dir, self.weights_label, self.dtype = pipe, Path(out_dir), weights_label, dtype
        self.max_images, self.loras, self.controlnets = max_images, dict(loras or {}), dict(controlnets or {})
        self.max_side = max_side
        self.upload_pixels, self.upload_ttl_min = upload_pixels, upload_ttl_min  # see uploads.check_upload
        self.lock = threading.Lock()
        self.active_loras: list[str] = []
        self.seen: set = set()  # shapes and settings compiled already (what the status calls "compiling")

    # ---- requests ------------------------------------------------------------------------------
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

    def job(self, mode: str, fields: dict) -> Job:
        """This request checked as the command line checks it (ValueError: the command line's message)."""
        count = page_fields.image_count(mode, fields)
        if count > self.max_images:
            raise ValueError(f"at most {self.max_images} images per request (this server's --max-images), "
                             f"got {count}")
        seed = page_fields.pick_seed(fields.get("seed"), fields.get("random_seed"), count)
        request = page_fields.sampling_request(mode, fields, seed=seed, loras=self.lora_specs(fields))
        checked = request.check()
        settings = checked.settings(self.pipe)
        size = checked.request.height, checked.request.width
        self.check_size(*size, mode in IMAGE_MODES and bool(fields.get("use_image_size")))
        return Job(checked, settings, output_paths(check_output_dir(self.request_dir()), mode, checked.seeds))

    def prompt_notes(self, prompt: str, negative_prompt: str | None = None) -> str:
        """The text encoder's notes on prompts it truncates (the server log's warning), for the page."""
        named = [(p, n) for p, n in ((prompt, "the prompt"), (negative_prompt, "the negative prompt")) if p]
        notes = self.pipe.text.truncation_notes([p for p, _ in named], [n for _, n in named]) if named else []
        return "".join(f"\n\nNote: {note}" for note in notes)

    # ---- running -------------------------------------------------------------------------------
    def run(self, mode: str, fields: dict):
        """Yield ``Update``s while the request runs, then one ``Done``; errors raise with the pipeline's message."""
        job = self.job(mode, fields)
        request, settings = job.checked.request, job.settings
        stages = ["Stage B"] if mode == "reconstruct" else ["Stage C", "Stage B"]
        batch = len(job.checked.seeds)
        keys = {"Stage C": (mode, request.height, request.width, batch, program_settings(settings.prior),
                            request.strength),
                "Stage B": (request.height, request.width, batch, program_settings(settings.decoder))}

        def work(callback):
            if list(request.loras) != self.active_loras:
                # Merged into Stage C's weights: the shapes stay, so its compiled programs are reused.
                self.pipe.load_loras(list(request.loras))
                self.active_loras = list(request.loras)
            notes = self.prompt_notes(request.prompt, request.negative_prompt)  # with the LoRAs' new tokens
            result = job.checked.run(self.pipe, settings, callback=callback,
                                     callback_x0=self.pipe.previewer is not None)
            return result, notes

        result, notes = yield from self._stream(work, stages, keys, f"{request.height}x{request.width}")
        meta = job.checked.metadata(settings, weights=self.weights_label, dtype=self.dtype)
        paths = save_images(job.paths, result.images, seeds=result.seeds, metadata=meta)
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
    def control_job(self, fields: dict, image: np.ndarray, mask: np.ndarray | None):
        """(request, result paths, control image paths) of the ControlNet tab, checked as sample/controlnet.py
        checks its flags, with the uploaded image (and mask) as pixels: nothing is written before the results
        (no folder is left by a request that fails)."""
        control = fields.get("control")
        if control not in self.controlnets:
            raise ValueError(f"no ControlNet for {control!r} on this server; available: {sorted(self.controlnets)}")
        seed = page_fields.pick_seed(fields.get("seed"), fields.get("random_seed"), 1)
        request = page_fields.control_request(fields, image, mask, seed=seed)
        self.check_size(*request.check(), request.height is None)
        folder = check_output_dir(self.request_dir())
        return request, output_paths(folder, control, [seed]), output_paths(folder, "control", [seed])

    def run_controlnet(self, fields: dict, image: np.ndarray, mask: np.ndarray | None):
        """As ``run``, for the ControlNet tab (the ControlNet pipeline reports no per-step progress)."""
        if image is None:
            raise ValueError("ControlNet needs a control image: upload one")
        request, paths, control_paths = self.control_job(fields, image, mask)
        entry, settings = self.controlnets[request.control], request.settings()
        key = ("controlnet", request.control, request.height, request.width, request.prior_steps,
               request.decoder_steps)
        first = "compiling (first request of this size and settings; later ones reuse it), then sampling" \
            if key not in self.seen else "sampling"

        def work(callback):
            del callback  # ControlNetPipeline takes no progress callback
            result = request.run(entry.pipeline, request.load_inputs(), settings)
            return result, self.prompt_notes(request.prompt, request.negative_prompt)

        start = f"ControlNet {request.control}: {first} (this mode reports no per-step progress)..."
        result, notes = yield from self._stream(work, [], {}, start)
        meta = request.metadata(settings, weights=self.weights_label, controlnet=str(entry.source))
        written = save_images(paths, result.images, seeds=result.seeds, metadata=meta)
        written += save_images(control_paths, result.control_images, seeds=result.seeds, metadata=meta)
        self.seen.add(key)
        yield Done(written, f"Done: seed {result.seeds[0]}.  \n" + timing_report(result.timings).replace("\n", "  \n")
                   + notes)
