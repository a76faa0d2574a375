"""The embedded demo cascade: a tiny Stable Cascade trained by this project's trainers on generated
128x128 images of coloured shapes (``cascade_jax.data.shapes``), shipped as package data.

``StableCascadePipeline.from_pretrained("demo")`` and ``sample/generate.py --weights demo`` load it;
``make demo-weights`` (``train/demo.py``) rebuilds it from scratch.
"""

from __future__ import annotations

from pathlib import Path

NAME = "demo"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IMAGE_SIZE = 128  # the size the demo cascade was trained at (Stage C latents 3x3, Stage B 32x32)


def weights_dir() -> Path:
    """The shipped weights folder; a clear error when this checkout or wheel has none."""
    if not (WEIGHTS_DIR / "tokenizer").is_dir():
        raise FileNotFoundError(f"the demo cascade is not in {WEIGHTS_DIR}: this installation was built without "
                                "it. Rebuild it with `make demo-weights` (python train/demo.py), or pass real "
                                "weights (--weights DIR)")
    return WEIGHTS_DIR
