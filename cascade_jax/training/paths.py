"""The paths of a training config checked before any model is built or compiled: buckets that do not
exist, objects that are missing, folders that cannot be written, and checkpoint URLs Orbax cannot
write all fail here with one message naming the URL and the config key."""

from __future__ import annotations

from cascade_jax import storage
from cascade_jax.training.config import TrainConfig

WEIGHT_KEYS = ("generator_checkpoint_path", "effnet_checkpoint_path", "previewer_checkpoint_path",
               "stage_a_checkpoint_path", "controlnet_checkpoint_path", "lora_checkpoint_path", "tokenizer_path",
               "clip_text_model_name", "clip_image_model_name")


def check_run_paths(cfg: TrainConfig) -> None:
    storage.orbax_path(storage.join(cfg.checkpoint_path, cfg.experiment_id), "checkpoint_path")
    for key in ("checkpoint_path", "output_path"):
        storage.check_writable(getattr(cfg, key), key)
    for key in WEIGHT_KEYS:
        value = cfg.get(key)
        if isinstance(value, str) and storage.is_url(value):
            storage.check_readable(value, key)
    data = cfg.data_config()
    for path in [*data.get("paths", ()), data.get("tfds_data_dir"), data.get("index_cache")]:
        if isinstance(path, str) and storage.is_url(path):
            # The bucket only: a path may be a glob or a brace range, which the loader expands.
            storage.check_readable(storage.bucket_of(path), "data bucket")
