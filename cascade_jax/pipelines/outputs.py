"""Writing results: PNGs that carry their prompt, seed and settings, and a timing summary.

The output folder may be a local path or a bucket URL (``gs://``, ``s3://``): there each PNG is one
object, published whole (a single PUT), and the paths are URL strings instead of ``Path`` objects.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from cascade_jax import storage
from cascade_jax.storage import atomic


def save_png(path, image: np.ndarray, metadata: dict):
    """Write ``image`` (H, W, 3 uint8) atomically with ``metadata`` as PNG text chunks (JSON values)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    if storage.is_url(path):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
        storage.write_bytes(path, buffer.getvalue())  # an object appears whole: no temp name needed
        return
    with atomic.replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def read_png_metadata(path) -> dict:
    with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path) as image:
        return dict(image.text)


def check_output_dir(out_dir) -> Path | str:
    """Prove ``out_dir`` writable now, before any work whose result would be lost, without creating it:
    a run that fails later leaves no empty folder behind (``save_images`` creates it). A bucket URL is
    proved by writing (and deleting) a small probe object there."""
    if storage.is_url(out_dir):
        try:
            storage.check_writable(out_dir, "--out")
        except OSError as e:  # names "--out URL" and the cause (no bucket, no permission, unreachable)
            raise ValueError(str(e)) from None
        return storage.absolute(out_dir)
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


def output_paths(out_dir, prefix: str, seeds, *, overwrite: bool = False) -> list:
    """``PREFIX_II_seedS.png`` per image; unless ``overwrite``, a ``-N`` suffix (the smallest that makes
    every name of this run new) keeps earlier results instead of replacing them. Paths in a bucket are
    URL strings, checked against one listing of the folder."""
    if storage.is_url(out_dir):
        taken = set() if overwrite or not storage.isdir(out_dir) else set(storage.listing(out_dir))
        exists, place = (lambda url: storage.name(url) in taken), (lambda name: storage.join(out_dir, name))
    else:
        exists, place = (lambda p: p.exists()), Path(out_dir).joinpath
    names = [f"{prefix}_{i:02d}_seed{seed}" for i, seed in enumerate(seeds)]
    for n in range(0, 1 << 20):
        paths = [place(f"{name}-{n}.png" if n else f"{name}.png") for name in names]
        if overwrite or not any(exists(p) for p in paths):
            return paths
    raise ValueError(f"--out {out_dir} holds too many earlier results named {names[0]}; choose another folder")


def save_images(paths, images, *, seeds, metadata: dict) -> list:
    """Write each image to its path (from ``output_paths``) with ``metadata`` and its seed; the folders are
    made now, when there is something to write."""
    for folder in {Path(p).parent for p in paths if not storage.is_url(p)}:  # a bucket needs no folders
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
