"""A prepared TensorFlow Datasets dataset, read at random through ``tfds.data_source``.

``tfds.data_source`` reads ArrayRecord files with numpy only, so TensorFlow is not needed (the
dataset must have been prepared with ``file_format="array_record"``; ``tfds build
--file_format=array_record``). Image features are read undecoded and decoded on the loader's
threads; the caption feature may be nested (``captions/text``) and may hold several captions, of
which the first non-empty one is used. Filters read the example's scalar features plus the image's
``width``/``height``.
"""

from __future__ import annotations

import numpy as np

from cascade_jax import storage
from cascade_jax.data.config import DataConfig
from cascade_jax.data.filters import MetadataFilter
from cascade_jax.data.sources import RawSample, SkipSample, check_filters, open_image, text_of


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("the tfds data source needs tensorflow-datasets: pip install 'cascade-jax[train]'") from None
    return tfds


def _feature(example: dict, path: str, name: str, reason: str):
    value = example
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise SkipSample(reason, f"{name}: no feature {path!r}")
        value = value[part]
    return value


def local_data_dir(tfds_name: str, data_dir: str | None) -> str | None:
    """``data_dir``, or for a bucket URL a local mirror of the dataset's folder in it: ArrayRecord files are
    read through local file descriptors. Only the named dataset is copied, and only files that changed."""
    if data_dir is None or not storage.is_url(data_dir):
        return data_dir
    name = tfds_name.split(":")[0].split("/")[0]
    wanted = {f"{name}/{rel}": st for rel, st in storage.listing(storage.join(data_dir, name)).items()}
    if not wanted:
        raise FileNotFoundError(f"tfds dataset {tfds_name!r}: nothing under {storage.join(data_dir, name)}; check "
                                f"tfds_name and tfds_data_dir")
    return str(storage.mirror(data_dir, wanted))


class TfdsSource:
    """Examples of ``tfds_name`` / ``tfds_split`` under ``tfds_data_dir``."""

    def __init__(self, cfg: DataConfig):
        tfds = _import_tfds()
        data_dir = cfg.tfds_data_dir or "~/tensorflow_datasets"
        self.description = f"tfds {cfg.tfds_name!r} split {cfg.tfds_split!r} in {data_dir}"
        self.image_key, self.caption_key = cfg.image_keys[0], cfg.caption_field
        self.filters = MetadataFilter(cfg.filters)
        try:
            builder = tfds.builder(cfg.tfds_name, data_dir=local_data_dir(cfg.tfds_name, cfg.tfds_data_dir))
        except tfds.core.registered.DatasetNotFoundError as err:
            raise ValueError(f"{self.description}: no such dataset ({str(err).splitlines()[0]}); "
                             f"check tfds_name and tfds_data_dir") from None
        if not builder.is_prepared():
            raise ValueError(f"{self.description} is not prepared there; build it with `tfds build {cfg.tfds_name} "
                             f"--data_dir DIR --file_format=array_record` (or download_and_prepare)")
        features = builder.info.features
        if self.image_key not in features:
            raise ValueError(f"{self.description} has no image feature {self.image_key!r}; its features: "
                             f"{', '.join(features)} (set image_key)")
        if self.caption_key.split("/")[0] not in features:
            raise ValueError(f"{self.description} has no caption feature {self.caption_key!r}; its features: "
                             f"{', '.join(features)} (set caption_key)")
        # Undecoded images: the loader's threads decode them, and probing reads headers only.
        decoders = ({self.image_key: tfds.decode.SkipDecoding()}
                    if isinstance(features[self.image_key], tfds.features.Image) else None)
        try:
            self.data = builder.as_data_source(split=cfg.tfds_split, decoders=decoders)
        except (ValueError, NotImplementedError, FileNotFoundError) as err:
            raise ValueError(f"{self.description} cannot be read at random ({err}); prepare it with "
                             f"file_format='array_record'") from None
        self.records = list(range(len(self.data)))
        if not self.records:
            raise ValueError(f"{self.description} has no examples")

    def read(self, record: int) -> RawSample:
        name = f"{self.description} example {record}"
        try:
            example = self.data[record]
        except (OSError, ValueError, KeyError) as err:
            raise SkipSample("unreadable", f"{name}: {err}") from None
        image = _feature(example, self.image_key, name, "no_image")
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            raise SkipSample("corrupt_image", f"{name}: image feature has dtype {image.dtype}, expected uint8")
        raw = RawSample(image, text_of(_feature(example, self.caption_key, name, "no_caption"), name), name)
        if self.filters:
            width, height = open_image(raw).size
            scalars = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                       for k, v in example.items() if np.ndim(v) == 0}
            check_filters(self.filters, {"width": width, "height": height, **scalars}, name)
        return raw
