"""Tiny image/caption datasets written by the data tests: WebDataset shards and image folders."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) cycle: square, landscape and portrait images for the buckets.
SIZES = [(96, 96), (128, 64), (64, 128), (120, 90)]


def image_bytes(index: int, size=None, fmt: str = "JPEG") -> bytes:
    """A small image whose colour encodes ``index`` (so tests can tell samples apart)."""
    width, height = size or SIZES[index % len(SIZES)]
    rng = np.random.default_rng(index)
    pixels = np.full((height, width, 3), (index * 37 % 256, index * 91 % 256, 128), np.uint8)
    pixels[:4, :4] = rng.integers(0, 256, (4, 4, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n_shards: int, per_shard: int, caption: str = "txt", extra=None) -> list[Path]:
    """shard-000.tar ...: sample i has an image (jpg, png or webp), a caption and json metadata.

    ``caption``: "txt" (a .txt member) or "json" (the json field "caption"). ``extra(i, tar)`` may
    add or replace members (a corrupt image, a missing caption).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    for s in range(n_shards):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{i:06d}"
                if extra is not None and extra(i, key, tar):
                    continue
                ext, fmt = formats[i % len(formats)]
                width, height = SIZES[i % len(SIZES)]
                meta = {"width": width * 10, "height": height * 10, "aesthetic": 4 + i % 3}
                if caption == "json":
                    meta["caption"] = f"caption {i}"
                else:
                    add_member(tar, f"{key}.txt", f"caption {i}".encode())
                add_member(tar, f"{key}.{ext}", image_bytes(i, fmt=fmt))
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
    return paths


def write_folder(folder: Path, n: int, skip_caption=()) -> Path:
    """img_000.png ... with img_000.txt captions (none for the indices in ``skip_caption``)."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / ("sub" if i % 2 else "") / f"img_{i:03d}"
        target.with_suffix(".png").write_bytes(image_bytes(i, fmt="PNG"))
        if i not in skip_caption:
            target.with_suffix(".txt").write_text(f"caption {i}")
    return folder


def caption_index(caption: str) -> int:
    return int(caption.split()[-1])


def read_all(iterator, steps: int) -> list[dict]:
    return [next(iterator) for _ in range(steps)]
