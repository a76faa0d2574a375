"""Latent caching: a Stage C run from cached encoder outputs takes the same steps as the run that
encodes every batch (same losses), and is faster per step."""

from __future__ import annotations

import numpy as np
from training_testing import ImageData

from cascade_jax.training import load_config, train
from cascade_jax.training.latent_cache import CachedBatches, write_cache

STEPS = 8


def test_cached_run_equals_encoding_run_and_is_faster(tmp_path):
    overrides = [f"checkpoint_path={tmp_path / 'ckpt'}", f"output_path={tmp_path / 'out'}", f"updates={STEPS}",
                 "save_every=1000", "batch_size=8"]
    cfg = load_config("tiny_c", overrides + ["experiment_id=encode"])
    encoding = train(cfg, data=ImageData(8, cfg.image_size), progress=False)
    write_cache(cfg, ImageData(8, cfg.image_size), tmp_path / "cache", STEPS)
    cached_cfg = load_config("tiny_c", overrides + ["experiment_id=cached", "cached_conditions=true"])
    cached = train(cached_cfg, data=CachedBatches(tmp_path / "cache"), progress=False)
    a, b = ([h["loss"] for h in run.history] for run in (encoding, cached))
    np.testing.assert_allclose(b, a, rtol=1e-5)
    speed = {name: float(np.median([h["steps_per_s"] for h in run.history[2:]]))
             for name, run in (("encoding", encoding), ("cached", cached))}
    print(f"tiny stage c, batch 8 at 64px: {speed['encoding']:.1f} steps/s encoding, {speed['cached']:.1f} cached "
          f"({speed['cached'] / speed['encoding']:.1f}x)")
    assert speed["cached"] > speed["encoding"]
