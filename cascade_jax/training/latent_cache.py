"""Latent caching: run the frozen encoders once, write their outputs, train from them.

``write_cache`` runs the task's host preprocessing and frozen encoders (EfficientNet, CLIP) on
the loader's batches and writes one ``.npz`` per batch; ``CachedBatches`` reads them back in
order with a checkpointable position, for a config with ``cached_conditions: true``. The random
choices (caption -> "", which samples get a CLIP image embedding for Stage C; the batch's
EfficientNet size and which samples get zeroed EfficientNet latents for Stage B) are made when the
cache is written with the same per-step seeds, so a cached run sees what the uncached run sees
for those steps; reusing a cache for further epochs repeats them (the trade for the speed). A
Stage B file holds its batch's EfficientNet latents at the size that step drew, so the cached run
compiles the same shapes as the uncached one.
"""

from __future__ import annotations

import io
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cascade_jax import storage
from cascade_jax.storage import atomic
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.loop import host_rng
from cascade_jax.training.task import get_task


def write_cache(cfg: TrainConfig, data, out_dir, batches: int) -> Path:
    """Encode ``batches`` loader batches of the (uncached) ``cfg`` into ``out_dir/00000000.npz``..."""
    if cfg.stage not in ("b", "c"):
        raise ValueError(f"latent caching supports stages b and c, not {cfg.stage!r}")
    task = get_task(cfg.stage)
    modules = task.build(cfg)
    graphdef, state = nnx.split(modules)
    encode = jax.jit(lambda state, batch: task.conditions(nnx.merge(graphdef, state), batch))
    if storage.is_url(out_dir):
        out = str(out_dir)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
    for step in range(batches):
        arrays = task.host_batch(cfg, next(data), host_rng(cfg, step))
        values = jax.device_get(encode(state, arrays))
        if storage.is_url(out):  # one object per batch, published whole
            buffer = io.BytesIO()
            np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in zip(task.cached_keys, values)})
            storage.write_bytes(storage.join(out, f"{step:08d}.npz"), buffer.getvalue())
            continue
        with atomic.replacing(out / f"{step:08d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v, np.float32) for k, v in zip(task.cached_keys, values)})
    return out


class CachedBatches:
    """Cached batches in file order (cycling), with ``get_state``/``set_state`` for exact resume."""

    def __init__(self, cache_dir):
        if storage.is_url(cache_dir):
            self.files = [storage.join(cache_dir, rel) for rel in sorted(storage.listing(cache_dir))
                          if rel.endswith(".npz") and "/" not in rel]
        else:
            self.files = sorted(Path(cache_dir).glob("*.npz"))
        if not self.files:
            raise FileNotFoundError(f"no cached batches (*.npz) in {cache_dir}; run write_cache first")
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        with np.load(io.BytesIO(storage.read_bytes(self.files[self.position % len(self.files)]))) as data:
            batch = {k: data[k] for k in data.files}
        self.position += 1
        return batch

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict):
        self.position = int(state["position"])
