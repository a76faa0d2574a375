"""The embedded demo cascade: a tiny Stable Cascade trained by this project's trainers on generated
128x128 images of coloured shapes (``cascade_jax.demo.shapes``), shipped as package data.

``StableCascadePipeline.from_pretrained("demo")`` and ``sample/generate.py --weights demo`` load it;
``make demo-weights`` (``train/demo.py``, ``cascade_jax.demo.recipe``) rebuilds it from scratch.

A project on the library, using only its public extension points: this module registers the named weight
sets (``cascade_jax.named_weights``; the package root imports it, so the names resolve wherever the library
is used), the training configs name its loss-weight plug-in (``cascade_jax.demo.loss_weights``) and read its
data through the ``folder`` source. Importing this module stays cheap: the recipe, the dataset, the scorer and
the evaluation commands are submodules.
"""

from __future__ import annotations

from pathlib import Path

from cascade_jax.named_weights import WeightSet, register

NAME = "demo"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# demo-lcm: the demo with its Stage C distilled for few-step sampling (``make demo-lcm-weights``,
# ``cascade_jax.demo.lcm_recipe``): an LCM-LoRA and its sampler settings, beside the demo weights.
LCM_NAME = "demo-lcm"
LCM_DIR = Path(__file__).resolve().parent / "lcm"
LCM_LORA_FILE = "lcm_lora.safetensors"
IMAGE_SIZE = 128  # the size the demo cascade was trained at (Stage C latents 3x3, Stage B 32x32)


def weights_dir() -> Path:
    """The shipped weights folder; a clear error when this checkout or wheel has none."""
    if not (WEIGHTS_DIR / "tokenizer").is_dir():
        raise FileNotFoundError(f"the demo cascade is not in {WEIGHTS_DIR}: this installation was built without "
                                "it. Rebuild it with `make demo-weights` (python train/demo.py), or pass real "
                                "weights (--weights DIR)")
    return WEIGHTS_DIR


def lcm_dir() -> Path:
    """The shipped demo-lcm folder (LoRA and sampling.json); a clear error when it is absent."""
    if not (LCM_DIR / LCM_LORA_FILE).is_file():
        raise FileNotFoundError(f"demo-lcm is not in {LCM_DIR}: distil it with `make demo-lcm-weights` "
                                "(python train/demo_lcm.py), or use --weights demo")
    return LCM_DIR


register(NAME, WeightSet(weights_dir, dtype="float32", image_size=IMAGE_SIZE))
register(LCM_NAME, WeightSet(weights_dir, loras=lambda: (lcm_dir() / LCM_LORA_FILE,), sampling=lcm_dir,
                             dtype="float32", image_size=IMAGE_SIZE))
