"""Latent caching: a Stage C or Stage B run from cached encoder outputs takes the same steps as the
run that encodes every batch (same losses), and is faster per step."""

from __future__ import annotations

import numpy as np
import pytest
from training_testing import ImageData

from cascade_jax.training import load_config, train
from cascade_jax.training.latent_cache import CachedBatches, write_cache

STEPS = 8


# Stage B at 128px: the per-step EfficientNet factor U(0.5, 1) gives 64 or 96 px inputs, so the
# cache holds batches of two EfficientNet sizes (at 64px every step would draw 32).
@pytest.mark.parametrize("config,image_size", [("tiny_c", 64), ("tiny_b", 128)])
def test_cached_run_equals_encoding_run_and_is_faster(tmp_path, config, image_size):
    overrides = [f"checkpoint_path={tmp_path / 'ckpt'}", f"output_path={tmp_path / 'out'}", f"updates={STEPS}",
                 "save_every=1000", "batch_size=8", f"image_size={image_size}"]
    cfg = load_config(config, overrides + ["experiment_id=encode"])
    encoding = train(cfg, data=ImageData(8, cfg.image_size), progress=False)
    write_cache(cfg, ImageData(8, cfg.image_size), tmp_path / "cache", STEPS)
    if config == "tiny_b":
        sizes = {np.load(f)["effnet"].shape for f in (tmp_path / "cache").glob("*.npz")}
        assert len(sizes) > 1, sizes
    cached_cfg = load_config(config, overrides + ["experiment_id=cached", "cached_conditions=true"])
    cached = train(cached_cfg, data=CachedBatches(tmp_path / "cache"), progress=False)
    a, b = ([h["loss"] for h in run.history] for run in (encoding, cached))
    np.testing.assert_allclose(b, a, rtol=1e-5)
    print(f"{config}: largest relative loss difference {np.max(np.abs(np.subtract(b, a)) / np.abs(a)):.2e}")
    speed = {name: float(np.median([h["steps_per_s"] for h in run.history[2:]]))
             for name, run in (("encoding", encoding), ("cached", cached))}
    print(f"{config}, batch 8 at {image_size}px: {speed['encoding']:.1f} steps/s encoding, {speed['cached']:.1f} "
          f"cached ({speed['cached'] / speed['encoding']:.1f}x)")
    assert speed["cached"] > speed["encoding"]
