"""The compiled per-stage sampling program: data-parallel batches, per-image seeds, compile cache."""

import jax
import numpy as np
import pytest
from helpers import relative_error

from cascade_jax.diffusion import SamplerSettings
from cascade_jax.models.random_init import random_model
from cascade_jax.pipelines.loading import pipeline_set
from cascade_jax.pipelines.stage_runner import StageRunner, StageTiming, image_keys


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
    assert len(batch.sharding.device_set) == 8 and {s.data.shape[0] for s in batch.addressable_shards} == {1}
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


def _hlo(stage, settings, progress, args, batch):
    return stage.lower(settings, (4, 4, 16), progress, args, batch).as_text()


def test_progress_callback_runs_in_order_from_the_compiled_loop_and_changes_nothing(runner):
    """Sharded batch of 8: one event per step in step order, x0 of the last step == the stage's result,
    the same numbers as without a callback, and no callback in the program when none is given."""
    stage, config = runner
    settings = SamplerSettings(steps=3, cfg=4.0, shift=2.0, cfg_std_per_sample=True)
    batch = 8 if jax.local_device_count() >= 8 else 2
    cond = _conditions(config, batch, 1)
    uncond = {k: np.zeros_like(v) for k, v in cond.items()}
    seeds = list(range(batch))
    plain = np.asarray(stage(settings, (4, 4, 16), seeds, cond, uncond))
    events = []
    with_x0 = stage(settings, (4, 4, 16), seeds, cond, uncond, callback=events.append, callback_x0=True)
    assert [(e.stage, e.step, e.steps) for e in events] == [("Stage C", i, 3) for i in (1, 2, 3)]
    assert all(e.x0.shape == (batch, 4, 4, 16) for e in events)
    np.testing.assert_array_equal(events[-1].x0, np.asarray(with_x0))
    assert relative_error(events[0].x0, events[-1].x0) > 0.01  # a real per-step value, not the result 3 times
    np.testing.assert_allclose(np.asarray(with_x0), plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    steps_only = []
    stage(settings, (4, 4, 16), seeds, cond, uncond, callback=steps_only.append)
    assert [e.step for e in steps_only] == [1, 2, 3] and steps_only[0].x0 is None

    args = stage._arguments(settings, seeds, cond, uncond, None, 0)
    assert "callback" not in _hlo(stage, settings, None, args, batch).lower()
    assert "callback" in _hlo(stage, settings, "step", args, batch).lower()


def test_callback_errors_reach_the_caller(runner):
    stage, config = runner
    settings = SamplerSettings(steps=2, cfg=None, shift=2.0)
    cond = _conditions(config, 1, 2)

    def fail(event):
        raise RuntimeError(f"stop at step {event.step}")

    with pytest.raises(RuntimeError, match="stop at step 1"):
        stage(settings, (4, 4, 16), [0], cond, None, callback=fail)


@pytest.mark.parametrize("seeds", [[-1], [1 << 32], [1.5], ["7"], [True]])
def test_seeds_outside_uint32_or_not_integers_are_refused(seeds):
    with pytest.raises(ValueError, match=r"seeds must be integers in \[0, 2\*\*32\)"):
        image_keys(seeds)


def test_noise_streams_of_one_seed_are_independent_and_any_uint32_seed_works():
    top = (1 << 32) - 1
    keys = [jax.random.key_data(image_keys([top, 3 << 30], stream)) for stream in (0, 1, 2)]
    assert all(not np.array_equal(keys[i], keys[j]) for i in range(3) for j in range(i))
    np.testing.assert_array_equal(keys[0], jax.random.key_data(jax.vmap(jax.random.key)(
        np.asarray([top, 3 << 30], np.uint32))))  # stream 0 is the seed's own key (Stage C unchanged)


def test_a_new_guidance_scale_reuses_the_program(runner):
    """The guidance scale is an argument of the compiled loop, not a constant of it (the
    official parity tests run through it). The settings and batch of the progress test above: in a full
    run this test compiles nothing."""
    stage, config = runner
    batch = 8 if jax.local_device_count() >= 8 else 2
    cond = _conditions(config, batch, 1)
    uncond = {k: np.zeros_like(v) for k, v in cond.items()}
    results, compiles = {}, None
    for cfg in (4.0, 5.5, (6.0, 2.0)):
        timing = StageTiming()
        settings = SamplerSettings(steps=3, cfg=cfg, shift=2.0, cfg_std_per_sample=True)
        results[cfg] = np.asarray(stage(settings, (4, 4, 16), list(range(batch)), cond, uncond, timing=timing))
        compiles = stage._compiled.compiles if compiles is None else compiles
        assert stage._compiled.compiles == compiles and (timing.cached or cfg == 4.0), cfg
    assert relative_error(results[5.5], results[4.0]) > 1e-3 and relative_error(results[(6.0, 2.0)], results[5.5]) > 1e-3


def test_program_cache_keeps_the_most_recent_and_frees_the_rest():
    import gc
    import weakref

    from cascade_jax.pipelines.programs import ProgramCache

    class Program:  # stands in for a compiled program
        pass

    cache = ProgramCache(2)
    programs = [Program() for _ in range(3)]
    refs = [weakref.ref(p) for p in programs]
    cache.put("a", programs[0])
    cache.put("b", programs[1])
    assert cache.get("a") is programs[0]  # "a" is now the most recently used
    cache.put("c", programs[2])
    del programs
    gc.collect()
    assert list(cache) == ["a", "c"] and cache.compiles == 3 and refs[1]() is None
    with pytest.raises(ValueError, match="max_size must be a positive integer"):
        ProgramCache(0)
