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


_TFDS_BUILDER = None
TFDS_NAME = "cascade_tiny_captions"


def write_tfds(root: Path, n: int = 10, empty_caption=(4,)) -> str:
    """A TFDS dataset ``cascade_tiny_captions`` (ArrayRecord, no TensorFlow) under ``root``; returns data_dir.

    Features: ``picture`` (PNG, sizes cycling through SIZES), ``meta/text`` ("caption i", empty for
    the indices in ``empty_caption``) and ``aesthetic`` (= i).
    """
    builder_cls = _tfds_builder()
    builder_cls.examples = [(i, "" if i in empty_caption else f"caption {i}") for i in range(n)]
    builder_cls(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def _tfds_builder():
    global _TFDS_BUILDER
    if _TFDS_BUILDER is None:
        import tensorflow_datasets as tfds

        class CascadeTinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            examples: list = []

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "picture": tfds.features.Image(shape=(None, None, 3)),
                    "meta": {"text": tfds.features.Text()},
                    "aesthetic": np.float32,
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, text in self.examples:
                    # An encoded file object is stored as is; encoding an array would need TensorFlow.
                    png = io.BytesIO(image_bytes(i, fmt="PNG"))
                    yield i, {"picture": png, "meta": {"text": text}, "aesthetic": float(i)}

        _TFDS_BUILDER = CascadeTinyCaptions
    return _TFDS_BUILDER
