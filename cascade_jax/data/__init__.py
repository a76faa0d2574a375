"""Data: image preprocessing, datasets, aspect-ratio buckets."""

# The training loader needs Grain (the `train` extra): resolve its names on first use, so the
# tokenizer and image preprocessing import without it.
_TRAINING_NAMES = {
    "DataConfig": "cascade_jax.data.config",
    "make_train_loader": "cascade_jax.data.loader",
    "TrainLoader": "cascade_jax.data.loader",
    "TrainIterator": "cascade_jax.data.loader",
    "global_batch": "cascade_jax.data.sharded_batch",
}


def __getattr__(name):
    if name in _TRAINING_NAMES:
        import importlib

        return getattr(importlib.import_module(_TRAINING_NAMES[name]), name)
    raise AttributeError(f"module 'cascade_jax.data' has no attribute {name!r}")
