"""``DataConfig``: what the training loader reads and how, as one frozen, typed object.

Built from a dict (a YAML section) with :meth:`DataConfig.from_dict`; an unknown key is an error
that names the closest valid one, so a typo never silently falls back to a default. The official
flat training keys map onto it as ``webdataset_path -> paths`` and ``dataset_filters -> filters``
(the trainer config does that mapping).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from cascade_jax.data.config_values import coerce_dataclass_fields

SOURCES = ("webdataset", "folder", "tfds")
MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS (its DecompressionBombWarning threshold)

# Per-source defaults when image_key / caption_key are left unset.
DEFAULT_IMAGE_KEYS = {"webdataset": "jpg,jpeg,png,webp", "folder": "jpg,jpeg,png,webp", "tfds": "image"}
DEFAULT_CAPTION_KEYS = {"webdataset": "txt", "folder": "txt", "tfds": "caption"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training images and captions come from.

    source: ``webdataset`` (tar shards), ``folder`` (images with ``.txt`` captions) or ``tfds``.
    paths: shard paths, globs or brace ranges (``shards/part-{000..009}.tar``) for webdataset;
        the image folder(s) for folder.
    filters: the official ``dataset_filters`` (``[key, "lambda w: w >= 768"]`` pairs, a list of
        keys for a multi-argument lambda) or short forms such as ``"width>=768"``; evaluated safely
        on each sample's JSON metadata (see ``cascade_jax.data.filters``).
    image_key: comma-separated member extensions (webdataset, folder) or the TFDS image feature.
    caption_key: the caption member's extension (``txt``), ``json:FIELD`` for a field of the
        sample's ``.json`` member, or the TFDS caption feature (``a/b`` for a nested one).
    num_workers: decoding threads. prefetch_batches: batches decoded ahead of the trainer.
    shuffle: a global, per-epoch reshuffle of the sample order (seeded, the same on every host).
    bucket_random_ratio: the official ``bucketeer_random_ratio``: share of steps that use a
        uniformly drawn bucket instead of one drawn from the data's aspect ratios.
    bucket_probe_size: usable samples whose aspect ratios estimate the bucket frequencies.
    max_pending: samples held back for other buckets before one is cropped into the current
        bucket instead (None: 4 x the per-host batch, at least 16).
    index_cache: a folder for the webdataset shard indexes (member offsets), so a restart does not
        scan every tar header again; safe to share between hosts.
    max_image_pixels: images with more pixels (width x height, read from the file's header) are
        skipped and counted as ``too_large`` without being decoded: a small PNG can hold a 144-megapixel
        "decompression bomb". Default: PIL's own threshold, which ``generate.py`` also refuses above.
    """

    source: str = "webdataset"
    paths: tuple[str, ...] = ()
    filters: tuple = ()
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    tfds_split: str = "train"
    image_key: str | None = None
    caption_key: str | None = None
    num_workers: int = 8
    prefetch_batches: int = 2
    shuffle: bool = True
    bucket_random_ratio: float = 0.05
    bucket_probe_size: int = 256
    max_pending: int | None = None
    index_cache: str | None = None
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self):
        # YAML and key=value overrides give strings easily: each field is read as its type or named.
        # paths / filters: one path or filter is a one-entry list (not its characters).
        coerce_dataclass_fields(self, "data.")
        if self.source not in SOURCES:
            raise ValueError(f"data source {self.source!r} is unknown; use one of {', '.join(SOURCES)}")
        if self.source in ("webdataset", "folder") and not self.paths:
            raise ValueError(f"data source {self.source!r} needs `paths` (shards or folders to read)")
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("data source 'tfds' needs `tfds_name` (and usually `tfds_data_dir`)")
        if self.num_workers < 1 or self.prefetch_batches < 1:
            raise ValueError(f"num_workers={self.num_workers} and prefetch_batches={self.prefetch_batches} "
                             f"must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels={self.max_image_pixels} must be >= 1 (pixels per image)")
        if not 0.0 <= self.bucket_random_ratio <= 1.0:
            raise ValueError(f"bucket_random_ratio={self.bucket_random_ratio} must lie in [0, 1]")

    @property
    def image_keys(self) -> tuple[str, ...]:
        value = self.image_key or DEFAULT_IMAGE_KEYS[self.source]
        return tuple(k.strip().lower().lstrip(".") for k in value.split(",") if k.strip())

    @property
    def caption_field(self) -> str:
        return self.caption_key or DEFAULT_CAPTION_KEYS[self.source]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        """A config from a mapping; unknown keys are an error naming the closest valid key."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
                raise ValueError(f"unknown data config key {key!r}: {hint}")
        return cls(**values)
