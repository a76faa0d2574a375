"""What the app builds once at start: the shared pipeline, the LoRA files to pick from, the ControlNets.
Each failure is a ValueError with the message the user sees (``sample/app.py`` prints it and exits)."""

from __future__ import annotations

from pathlib import Path

from cascade_jax import storage
from cascade_jax.app.service import ControlNetEntry
from cascade_jax.pipelines import StableCascadePipeline
from cascade_jax.pipelines.sources import default_dtype

APP_CONTROLS = ("canny", "inpainting", "super_resolution")  # identity needs face detection (not included)


def load_pipeline(weights: str | None, random: str | None, *, lite: bool = False, dtype: str | None = None):
    """(pipeline, weights label, the dtype results name: "" with random weights); without ``weights`` and
    ``random`` the demo weights."""
    if random:
        print(f"Using RANDOM weights ({random} configuration): the images will be noise-like patterns.")
        return StableCascadePipeline.random(random, dtype=dtype or "float32"), f"random:{random}", ""
    source = weights or "demo"
    dtype = dtype or default_dtype(source)  # a named set (demo, demo-lcm) says its own dtype
    try:
        pipe = StableCascadePipeline.from_pretrained(source, lite=lite, dtype=dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        if weights is None:
            raise ValueError(f"the demo weights cannot be loaded from this install ({e}).\nPass --weights DIR "
                             "(converted or official Stable Cascade weights) or --random tiny.") from None
        raise ValueError(str(e)) from None
    return pipe, source, dtype


def find_loras(folder) -> dict:
    """{file name: path or URL} of the LoRA files in ``folder`` (a local or bucket folder; None: none)."""
    if folder is None:
        return {}
    if storage.is_url(folder):  # a bucket folder: the files are applied from their URLs (copied once)
        try:
            found = storage.glob(storage.join(folder, "*.safetensors"))
        except OSError as e:
            raise ValueError(f"--lora {folder}: {e}") from None
        if not found:
            raise ValueError(f"--lora {folder} holds no LoRA files (*.safetensors)")
        return {storage.name(url): url for url, _ in found}
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--lora {folder} is not a folder of LoRA files")
    return {p.name: str(p) for p in sorted(folder.glob("*.safetensors"))}


def control_kinds(spec: str) -> tuple[list[str], str]:
    """``[TYPE=]FILE`` (or "random": one random ControlNet per kind) -> (controls, source)."""
    control, sep, source = spec.partition("=")
    if not sep:
        control, source = ("*", spec) if spec == "random" else (Path(spec).stem, spec)
    controls = list(APP_CONTROLS) if control == "*" else [control]
    if not set(controls) <= set(APP_CONTROLS):
        raise ValueError(f"--controlnet {spec}: say which control it is, TYPE=FILE with TYPE one of "
                         f"{', '.join(APP_CONTROLS)}")
    return controls, source


def build_controlnets(specs, pipe, *, random: str | None = None, dtype: str | None = None) -> dict:
    """{control: ControlNetEntry} sharing ``pipe``'s cascade; "random" ControlNets need ``random`` "tiny"."""
    from flax import nnx

    from cascade_jax.models.random_init import random_model
    from cascade_jax.pipelines.controlnet import ControlNetPipeline, load_controlnet, tiny_controlnet_config

    entries = {}
    for spec in specs:
        controls, source = control_kinds(spec)
        for i, name in enumerate(controls):
            if source == "random":
                if random != "tiny":
                    raise ValueError("--controlnet random needs --random tiny")
                stage_c = nnx.merge(pipe.prior.graphdef, pipe.prior.state)
                model = random_model("controlnet", tiny_controlnet_config(name, stage_c), seed=100 + i)
            else:
                try:
                    model = load_controlnet(source, name, dtype or "bfloat16")
                except (FileNotFoundError, ValueError, OSError) as e:
                    raise ValueError(f"--controlnet {spec}: {e}") from None
            entries[name] = ControlNetEntry(ControlNetPipeline(pipe, model, name), source)
    return entries
