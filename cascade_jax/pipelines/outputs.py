"""Writing results: PNGs that carry their prompt, seed and settings, and a timing summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from cascade_jax.storage import atomic


def save_png(path, image: np.ndarray, metadata: dict):
    """Write ``image`` (H, W, 3 uint8) atomically with ``metadata`` as PNG text chunks (JSON values)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    with atomic.replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def read_png_metadata(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def check_output_dir(out_dir) -> Path:
    """Prove ``out_dir`` writable now, before any work whose result would be lost, without creating it:
    a run that fails later leaves no empty folder behind (``save_images`` creates it)."""
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        if existing == out_dir:
            raise ValueError(f"--out {out_dir} is a file, not a folder; name a folder for the images")
        raise ValueError(f"--out {out_dir} cannot be created: {existing} is a file; name a folder for the images")
    if existing != out_dir:  # created at the first write; its nearest existing parent must take new entries
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out_dir} cannot be created: {existing} is not writable; choose another folder")
        return out_dir
    try:
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out_dir} is not writable ({e.strerror or e}); choose another folder") from None
    return out_dir


def output_paths(out_dir, prefix: str, seeds, *, overwrite: bool = False) -> list[Path]:
    """``PREFIX_II_seedS.png`` per image; unless ``overwrite``, a ``-N`` suffix (the smallest that makes
    every name of this run new) keeps earlier results instead of replacing them."""
    out_dir = Path(out_dir)
    names = [f"{prefix}_{i:02d}_seed{seed}" for i, seed in enumerate(seeds)]
    for n in range(0, 1 << 20):
        paths = [out_dir / (f"{name}-{n}.png" if n else f"{name}.png") for name in names]
        if overwrite or not any(p.exists() for p in paths):
            return paths
    raise ValueError(f"--out {out_dir} holds too many earlier results named {names[0]}; choose another folder")


def save_images(paths, images, *, seeds, metadata: dict) -> list[Path]:
    """Write each image to its path (from ``output_paths``) with ``metadata`` and its seed; the folders are
    made now, when there is something to write."""
    for folder in {Path(p).parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    for path, image, seed in zip(paths, images, seeds):
        save_png(path, image, {**metadata, "seed": seed})
    return list(paths)


def timing_report(timings: dict) -> str:
    lines = []
    for stage, t in timings.items():
        compile_part = "compiled earlier" if t.cached else f"compile {t.compile_s:.2f}s"
        lines.append(f"{stage}: {compile_part}, sampling {t.sample_s:.3f}s ({t.steps} steps)")
    return "\n".join(lines)
