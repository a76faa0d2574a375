"""Writing results: PNGs that carry their prompt, seed and settings, and a timing summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def save_png(path, image: np.ndarray, metadata: dict):
    """Write ``image`` (H, W, 3 uint8) atomically with ``metadata`` as PNG text chunks (JSON values)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def read_png_metadata(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def save_images(out_dir, images, *, prefix: str, seeds, metadata: dict) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, seed) in enumerate(zip(images, seeds)):
        path = out_dir / f"{prefix}_{i:02d}_seed{seed}.png"
        save_png(path, image, {**metadata, "seed": seed})
        paths.append(path)
    return paths


def timing_report(timings: dict) -> str:
    lines = []
    for stage, t in timings.items():
        compile_part = "compiled earlier" if t.cached else f"compile {t.compile_s:.2f}s"
        lines.append(f"{stage}: {compile_part}, sampling {t.sample_s:.3f}s ({t.steps} steps)")
    return "\n".join(lines)
