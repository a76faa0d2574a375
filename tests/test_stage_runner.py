"""The compiled per-stage sampling program: data-parallel batches, per-image seeds, compile cache."""

import jax
import numpy as np
import pytest

from cascade_jax.diffusion import SamplerSettings
from cascade_jax.models.random_init import random_model
from cascade_jax.pipelines.loading import pipeline_set
from cascade_jax.pipelines.stage_runner import StageRunner, StageTiming


@pytest.fixture(scope="module")
def runner():
    model, config = pipeline_set("tiny")["stage_c"]
    return StageRunner("Stage C", random_model(model, config, seed=0)), config


def _conditions(config, batch, seed):
    rng = np.random.default_rng(seed)
    draw = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"clip_text": draw(batch, 5, config["c_clip_text"]), "clip_text_pooled": draw(batch, 1, config["c_clip_text_pooled"]),
            "clip_img": np.zeros((batch, 1, config["c_clip_img"]), np.float32)}


def test_batch_is_sharded_and_each_image_matches_its_seed_alone(runner):
    if jax.local_device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    stage, config = runner
    settings = SamplerSettings(steps=2, cfg=4.0, shift=2.0, cfg_std_per_sample=True)
    cond = _conditions(config, 8, 0)
    uncond = {k: np.zeros_like(v) for k, v in cond.items()}
    seeds = list(range(100, 108))
    timing = StageTiming()
    batch = stage(settings, (4, 4, 16), seeds, cond, uncond, timing=timing)
    assert len(batch.sharding.device_set) == 8 and batch.sharding.spec[0] == "data"
    assert timing.compile_s > 0 and not timing.cached
    for i in (0, 5):
        alone = stage(settings, (4, 4, 16), [seeds[i]], {k: v[i:i + 1] for k, v in cond.items()},
                      {k: v[i:i + 1] for k, v in uncond.items()})
        err = np.max(np.abs(np.asarray(batch[i]) - np.asarray(alone[0]))) / np.max(np.abs(np.asarray(alone)))
        assert err <= 1e-5, f"image {i}: {err:.2e}"
    again = StageTiming()
    repeat = stage(settings, (4, 4, 16), seeds, cond, uncond, timing=again)
    assert again.cached and again.compile_s == 0
    np.testing.assert_array_equal(np.asarray(repeat), np.asarray(batch))  # same seeds, same numbers
