"""Random-access training sources: a list of small records and ``read(record) -> RawSample``.

A source never decodes eagerly and never raises on one bad sample: ``read`` raises
:class:`SkipSample` with a reason (``no_image``, ``no_caption``, ``filtered``, ``unreadable``,
``corrupt_image``) that the loader counts and moves past. A source with no records at all is an
error naming its path. Records are plain tuples so Grain can shuffle and slice them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cascade_jax import storage
from cascade_jax.data.clip_preprocess import to_rgb
from cascade_jax.data.config import DataConfig
from cascade_jax.data.filters import MetadataFilter

SKIP_REASONS = ("no_image", "no_caption", "filtered", "unreadable", "corrupt_image", "too_large")


class SkipSample(Exception):
    """A sample the loader drops and counts; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass
class RawSample:
    """Undecoded image (encoded bytes, or a uint8 array from TFDS) and its caption."""

    image: bytes | np.ndarray
    caption: str
    name: str


def open_image(raw: RawSample) -> Image.Image:
    """A lazily decoded PIL image (header read only); corrupt data raises SkipSample."""
    if isinstance(raw.image, np.ndarray):
        return Image.fromarray(np.squeeze(raw.image, axis=-1) if raw.image.shape[-1] == 1 else raw.image)
    try:
        return Image.open(io.BytesIO(raw.image))
    except Image.DecompressionBombError as err:  # over twice PIL's threshold: refused by PIL at the header
        raise SkipSample("too_large", f"{raw.name}: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SkipSample("corrupt_image", f"{raw.name}: {err}") from None


def check_pixels(image: Image.Image, max_pixels: int | None, name: str) -> None:
    """Refuse an image over ``max_pixels`` from its header size, before anything is decoded."""
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise SkipSample("too_large", f"{name}: {width}x{height} = {width * height} pixels is over max_image_pixels "
                                      f"{max_pixels} (a possible decompression bomb)")


def decode_rgb(raw: RawSample, max_pixels: int | None = None) -> Image.Image:
    """The fully decoded RGB image (alpha over white, as the CLIP preprocessing does); an image over
    ``max_pixels`` (by its header) is refused without decoding."""
    image = open_image(raw)
    check_pixels(image, max_pixels, raw.name)
    try:
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # truncated / bad streams
        raise SkipSample("corrupt_image", f"{raw.name}: {err}") from None


def text_of(value, what: str) -> str:
    """Caption text from bytes, a string or a list of candidates (first non-empty)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        texts = [text_of(v, what) for v in value]
        texts = [t for t in texts if t]
        if not texts:
            raise SkipSample("no_caption", f"{what}: empty caption list")
        return texts[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SkipSample("unreadable", f"{what}: caption is not UTF-8") from None
    if not isinstance(value, str):
        raise SkipSample("no_caption", f"{what}: caption is a {type(value).__name__}, not text")
    text = value.strip()
    if not text:
        raise SkipSample("no_caption", f"{what}: empty caption")
    return text


def check_filters(filters: MetadataFilter, metadata: dict | None, name: str) -> None:
    if filters and not filters(metadata or {}):
        raise SkipSample("filtered", name)


def parse_json(data: bytes, name: str) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise SkipSample("unreadable", f"{name}: bad JSON metadata ({err})") from None
    if not isinstance(value, dict):
        raise SkipSample("unreadable", f"{name}: JSON metadata is a {type(value).__name__}, not an object")
    return value


class FolderSource:
    """Images under one or more folders (recursively), each with a same-stem ``.txt`` caption.

    An optional same-stem ``.json`` holds the metadata the filters read; ``width``/``height``
    default to the image's own size, so ``width>=768`` works without metadata files.
    """

    def __init__(self, cfg: DataConfig):
        self.description = ", ".join(cfg.paths)
        self.caption_ext = cfg.caption_field.lstrip(".")
        self.filters = MetadataFilter(cfg.filters)
        exts = {"." + e for e in cfg.image_keys}
        records, listed = [], set()
        self.remote_files: set[str] = set()  # every file under the URL folders, from one listing each
        for folder in cfg.paths:
            if storage.is_url(folder):
                remote = [storage.join(folder, rel) for rel in sorted(storage.listing(folder))]
                self.remote_files.update(remote)
                listed.update(remote)
                records.extend(p for p in remote if os.path.splitext(p)[1].lower() in exts)
                continue
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"image folder {folder!r} does not exist or is not a folder")
            for path in sorted(Path(folder).rglob("*")):
                listed.add(str(path))
                if path.suffix.lower() in exts and path.is_file():
                    records.append(str(path))
        if not records:
            raise ValueError(f"no images ({', '.join(sorted(exts))}) under {self.description}")
        self.records = records
        # From the listing, without more I/O: the trainer says up front how many read() will skip.
        self.uncaptioned = [r for r in records if f"{os.path.splitext(r)[0]}.{self.caption_ext}" not in listed]

    def read(self, record: str) -> RawSample:
        stem = os.path.splitext(record)[0]
        exists = self.remote_files.__contains__ if storage.is_url(record) else os.path.exists
        try:
            data = storage.read_bytes(record)
            caption_path = f"{stem}.{self.caption_ext}"
            if not exists(caption_path):
                raise SkipSample("no_caption", f"{record}: no {caption_path}")
            caption = text_of(storage.read_bytes(caption_path), caption_path)
            metadata = None
            if self.filters:
                metadata = {}
                if exists(f"{stem}.json"):
                    metadata = parse_json(storage.read_bytes(f"{stem}.json"), f"{stem}.json")
        except storage.StorageError:
            raise  # the store is unreachable (retries used up): not one bad sample
        except OSError as err:
            raise SkipSample("unreadable", f"{record}: {err}") from None
        raw = RawSample(data, caption, record)
        if self.filters:
            width, height = open_image(raw).size
            check_filters(self.filters, {"width": width, "height": height, **metadata}, record)
        return raw
