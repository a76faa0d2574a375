"""StableCascadePipeline with the tiny random cascade (configs/pipelines/tiny.yaml), float32, on the CPU.

Every sampled image is 136x200 (HxW): non-square and not a multiple of 128, so Stage C runs at 4x5
and Stage B at 34x50 (odd, not a power of two). Each stage program is compiled once per batch size and
settings (StageRunner caches them), so the tests share: batch 1 and batch 8 (8 virtual CPU devices:
the batch is sharded one image per device) with PRIOR/DECODER below, and img2img's shortened prior.

Batch independence (measured on a 2-core CPU, jax 0.10.2): image i of a sharded batch of 8 matches
the same seed run alone to 2.1e-7 (Stage C) and 4.5e-7 (Stage B) max|Δ|/max|ref|, and its uint8 pixels
differ by at most 1 level (a rounding boundary); the bounds are 1e-5 relative and 1 level, since XLA
compiles a different program per batch size. The compiled Stage C program and the step-by-step loop
(tests/pipeline_testing.LoopRunner, used for the diffusers comparison) agree to 2.1e-7.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import relative_error
from pipeline_testing import LoopRunner, RecordingRunner

from cascade_jax.pipelines import (
    DECODER_DEFAULTS,
    PRIOR_DEFAULTS,
    SamplerSettings,
    StableCascadePipeline,
    latent_shapes,
    stage_b_latent_hw,
    stage_c_latent_hw,
)
from cascade_jax.pipelines import diffusers_call
from cascade_jax.pipelines.sizes import check_image_size
from cascade_jax.pipelines.stage_runner import StepEvent
from cascade_jax.weights.tree import named_variables

H, W = 136, 200
PRIOR = PRIOR_DEFAULTS.replace(steps=2)
DECODER = DECODER_DEFAULTS.replace(steps=2)
PROMPTS = ("a red cube on a table", "a blue ball")
LATENT_TOL = 1e-5  # max|Δ| / max|ref| between a batch member and its single run
PIXEL_TOL = 1  # uint8 levels


@pytest.fixture(scope="module")
def pipe():
    return StableCascadePipeline.random("tiny")


def t2i(pipe, prompt=PROMPTS[0], seed=0, **kwargs):
    return pipe.text_to_image(prompt, height=H, width=W, seed=seed, prior=PRIOR, decoder=DECODER, **kwargs)


@pytest.fixture(scope="module")
def single(pipe):
    """{(prompt, seed): output} of batch-1 runs, computed on demand and kept for the module."""
    cache = {}

    def get(prompt, seed):
        if (prompt, seed) not in cache:
            cache[(prompt, seed)] = t2i(pipe, prompt, seed)
        return cache[(prompt, seed)]

    return get


# ---- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, c_hw, b_hw", [
    ((1024, 1024), (24, 24), (256, 256)),
    ((1536, 1024), (36, 24), (384, 256)),
    ((1024, 1536), (24, 36), (256, 384)),
    ((720, 1280), (17, 30), (180, 320)),
    ((H, W), (4, 5), (34, 50)),
    ((64, 8192), (2, 192), (16, 2048)),
])
def test_latent_shape_rules(size, c_hw, b_hw):
    assert stage_c_latent_hw(*size) == c_hw
    assert stage_b_latent_hw(*size) == b_hw
    c_shape, b_shape = latent_shapes(*size, batch=3)
    assert c_shape == (3, *c_hw, 16) and b_shape == (3, *b_hw, 4)


@pytest.mark.parametrize("height, width, nearest", [
    (130, 200, "128x200"), (136, 203, "136x200"), (0, 128, "64x128"), (-8, 128, "64x128"),
    (100000, 128, "8192x128"), (128, 20, "128x64"),
])
def test_bad_sizes_name_the_nearest_valid_size(height, width, nearest):
    with pytest.raises(ValueError, match=f"nearest valid size is {nearest}"):
        check_image_size(height, width)


def test_bad_inputs_fail_before_sampling(pipe):
    with pytest.raises(ValueError, match="nearest valid size is 128x200"):
        pipe.text_to_image("x", height=130, width=200)
    with pytest.raises(ValueError, match="8192"):
        pipe.text_to_image("x", height=100000, width=1024)
    with pytest.raises(ValueError, match="integer number of pixels"):
        pipe.text_to_image("x", height=128.0, width=128)
    with pytest.raises(ValueError, match="no prompt given"):
        pipe.text_to_image([])
    with pytest.raises(ValueError, match="prompts must be strings"):
        pipe.text_to_image(["a cat", 3])
    with pytest.raises(ValueError, match="prompts must be strings"):
        pipe.text_to_image(None)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        pipe.text_to_image("x", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        pipe.text_to_image(list(PROMPTS), seed=[1, 2, 3])
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        PRIOR.replace(steps=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerSettings(steps=2, cfg=4.0, shift=2.0, sampler="euler")
    image = np.zeros((H, W, 3), np.uint8)
    for strength in (0, 0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            pipe.image_to_image(image, "x", strength=strength)
    with pytest.raises(ValueError, match="must share a size"):
        pipe.reconstruct([image, np.zeros((H, W + 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="must share a size"):
        pipe.image_variation([image, np.zeros((H + 8, W, 3), np.uint8)], height=H, width=W)
    with pytest.raises(ValueError, match="expected uint8 RGB"):
        pipe.reconstruct(np.zeros((H, W, 3), np.float32))
    with pytest.raises(ValueError, match="no images given"):
        pipe.reconstruct([])
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        pipe.image_to_image(image, list(PROMPTS))


def test_float16_is_refused():
    with pytest.raises(ValueError, match="float16 is not supported.*bfloat16 or float32"):
        StableCascadePipeline.random("tiny", dtype="float16")


# ---- determinism ---------------------------------------------------------------------------------
def test_same_seed_is_bit_exact_and_non_square_sizes_work(pipe, single):
    first = single(PROMPTS[0], 0)
    again = t2i(pipe, PROMPTS[0], 0)
    assert first.images.shape == (1, H, W, 3) and first.images.dtype == np.uint8
    assert first.stage_c_latents.shape == (1, 4, 5, 16) and first.stage_b_latents.shape == (1, 34, 50, 4)
    assert np.isfinite(first.stage_c_latents).all() and np.isfinite(first.stage_b_latents).all()
    assert first.images.std() > 1, "a constant image: the cascade did not run"
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.stage_c_latents, first.stage_c_latents)
    np.testing.assert_array_equal(again.stage_b_latents, first.stage_b_latents)
    assert first.seeds == again.seeds == [0]
    assert all(t.cached and t.compile_s == 0 for t in again.timings.values())  # one program per shape
    assert again.timings["stage_c"].steps == 2 and again.timings["stage_b"].steps == 2


def test_different_seeds_and_prompts_differ(single):
    base = single(PROMPTS[0], 0)
    for other in (single(PROMPTS[0], 1), single(PROMPTS[1], 5)):
        assert relative_error(other.stage_c_latents, base.stage_c_latents) > 0.1
        assert np.abs(other.images.astype(int) - base.images).mean() > 1


def test_batch_members_match_single_runs(pipe, single):
    """8 images (2 prompts x 4 per prompt, consecutive seeds) sharded over 8 devices, each == its solo run."""
    out = pipe.text_to_image(list(PROMPTS), height=H, width=W, num_images_per_prompt=4, seed=0, prior=PRIOR,
                             decoder=DECODER)
    assert out.images.shape == (8, H, W, 3) and out.seeds == list(range(8))
    errors_c, errors_b, levels = [], [], []
    for i in (0, 5):  # one image of each prompt, on different devices
        alone = single(PROMPTS[i // 4], i)  # repeat_interleave order: prompt 0 x4, then prompt 1 x4
        errors_c.append(relative_error(out.stage_c_latents[i], alone.stage_c_latents[0]))
        errors_b.append(relative_error(out.stage_b_latents[i], alone.stage_b_latents[0]))
        levels.append(int(np.abs(out.images[i].astype(int) - alone.images[0]).max()))
    print(f"batch vs single: Stage C max rel {max(errors_c):.2e}, Stage B max rel {max(errors_b):.2e}, "
          f"pixels max {max(levels)} levels")
    assert max(errors_c) <= LATENT_TOL and max(errors_b) <= LATENT_TOL and max(levels) <= PIXEL_TOL
    # An explicit seed list picks the same images in any order (the same program: no recompilation).
    again = pipe.text_to_image(list(PROMPTS), height=H, width=W, num_images_per_prompt=4,
                               seed=[3, 2, 1, 0, 7, 6, 5, 4], prior=PRIOR, decoder=DECODER)
    assert again.timings["stage_c"].cached and again.timings["stage_b"].cached
    order = [3, 2, 1, 0, 7, 6, 5, 4]
    assert relative_error(again.stage_b_latents, out.stage_b_latents[order]) <= LATENT_TOL
    assert np.abs(again.images.astype(int) - out.images[order]).max() <= PIXEL_TOL


def test_stage_runner_matches_step_by_step_loop_and_wiring(pipe, single):
    """The compiled Stage C program == ``sample_steps`` fed the same conditions and seeds; the stages
    get the documented conditioning (uncond = encoding of "", zero image embeddings / EfficientNet)."""
    reference = single(PROMPTS[0], 0)
    prior, decoder = RecordingRunner(pipe.prior), RecordingRunner(pipe.decoder)
    pipe.prior, pipe.decoder = prior, decoder
    try:
        out = t2i(pipe, PROMPTS[0], 0)
    finally:
        pipe.prior, pipe.decoder = prior.runner, decoder.runner
    np.testing.assert_array_equal(out.images, reference.images)
    (c_call,), (b_call,) = prior.calls, decoder.calls
    text, empty = pipe.text([PROMPTS[0]]), pipe.text([""])
    np.testing.assert_array_equal(c_call["conditions"]["clip_text"], text.clip_text)
    np.testing.assert_array_equal(c_call["conditions"]["clip_text_pooled"], text.clip_text_pooled)
    np.testing.assert_array_equal(c_call["uncond"]["clip_text"], empty.clip_text)
    np.testing.assert_array_equal(c_call["uncond"]["clip_text_pooled"], empty.clip_text_pooled)
    assert not np.any(c_call["conditions"]["clip_img"]) and not np.any(c_call["uncond"]["clip_img"])
    np.testing.assert_array_equal(b_call["conditions"]["effnet"], out.stage_c_latents)
    assert not np.any(b_call["uncond"]["effnet"])
    np.testing.assert_array_equal(b_call["conditions"]["clip"], text.clip_text_pooled)
    np.testing.assert_array_equal(b_call["uncond"]["clip"], empty.clip_text_pooled)
    assert b_call["seeds"] == c_call["seeds"] == [0]
    assert b_call["stream"] != c_call["stream"]  # Stage B's noise is not Stage C's
    settings = c_call["settings"]
    assert (settings.steps, settings.cfg, settings.shift, settings.cfg_rho) == (2, 4.0, 2.0, 0.7)

    loop = LoopRunner("Stage C", prior.runner)  # official mode
    x0 = loop(settings, c_call["x_shape"], c_call["seeds"], c_call["conditions"], c_call["uncond"])
    err = relative_error(x0, out.stage_c_latents)
    print(f"compiled Stage C program vs step-by-step loop: max rel {err:.2e}")
    assert err <= 1e-5


# ---- modes ---------------------------------------------------------------------------------------
def test_image_to_image_runs_a_shortened_schedule(pipe, single):
    image = single(PROMPTS[1], 5).images[0]
    prior = PRIOR.replace(steps=4)
    out = pipe.image_to_image(image, PROMPTS[0], strength=0.5, seed=0, prior=prior, decoder=DECODER)
    assert out.timings["stage_c"].steps == 2  # round(4 * 0.5)
    assert out.timings["stage_b"].steps == DECODER.steps
    compiled = [sig[0] for sig in pipe.prior._compiled]
    assert any(s.steps == 2 and s.t_start == 0.5 for s in compiled), compiled
    assert out.images.shape == (1, H, W, 3)
    text_only = single(PROMPTS[0], 0)
    assert relative_error(out.stage_c_latents, text_only.stage_c_latents) > 0.1
    assert np.abs(out.images.astype(int) - text_only.images).mean() > 1


def test_reconstruct_variation_and_preview_shapes(pipe, single):
    image = single(PROMPTS[0], 0).images[0]
    recon = pipe.reconstruct(image, seed=3, decoder=DECODER)
    assert recon.images.shape == (1, H, W, 3) and recon.stage_b_latents.shape == (1, 34, 50, 4)
    assert recon.stage_c_latents.shape == (1, 4, 5, 16)  # the EfficientNet latents
    assert list(recon.timings) == ["stage_b"]
    # The EfficientNet latents arrive laid out unlike Stage C's output; the text-to-image program is reused.
    assert recon.timings["stage_b"].cached

    variation = pipe.image_variation(image, height=H, width=W, seed=3, prior=PRIOR, decoder=DECODER)
    assert variation.images.shape == (1, H, W, 3) and variation.stage_c_latents.shape == (1, 4, 5, 16)
    assert variation.timings["stage_c"].cached  # clip_img is an input of the same program as text-to-image

    preview = pipe.preview(variation.stage_c_latents)
    assert preview.shape == (1, 32, 40, 3) and preview.dtype == np.uint8  # 8x the Stage C latent


# ---- the call shaped like diffusers' --------------------------------------------------------------
DIFFUSERS_STEPS = dict(height=H, width=W, prior_num_inference_steps=2, num_inference_steps=2)


def test_the_diffusers_shaped_call_is_text_to_image(pipe, single):
    base = single(PROMPTS[0], 0)
    pil = pipe(PROMPTS[0], generator=0, **DIFFUSERS_STEPS)
    assert [image.size for image in pil.images] == [(W, H)]
    np.testing.assert_array_equal(np.asarray(pil.images[0]), base.images[0])
    assert pil.timings["stage_c"].cached and pil.timings["stage_b"].cached  # one code path: the same programs
    (floats,) = pipe(PROMPTS[0], generator=0, output_type="np", return_dict=False, **DIFFUSERS_STEPS)
    assert floats.dtype == np.float32 and floats.shape == (1, H, W, 3) and floats.min() >= 0 and floats.max() <= 1
    np.testing.assert_array_equal(np.round(floats * 255).astype(np.uint8), base.images)  # not rounded before
    keyed = pipe(PROMPTS[0], generator=jax.random.key(5), output_type="latent", **DIFFUSERS_STEPS)
    seed = int(np.asarray(jax.random.bits(jax.random.key(5), (1,), np.uint32))[0])
    assert keyed.seeds == [seed] and keyed.images.shape == (1, 34, 50, 4)
    np.testing.assert_array_equal(keyed.images, keyed.stage_b_latents)


def test_diffusers_arguments_map_onto_the_settings_or_are_refused_by_name(pipe):
    decoder = diffusers_call.stage_settings(DECODER_DEFAULTS, "num_inference_steps", 12, "decoder_guidance_scale", 0.0)
    assert decoder.steps == 12 and decoder.cfg is None  # a scale <= 1: no guidance, as in diffusers
    prior = diffusers_call.stage_settings(PRIOR_DEFAULTS, "prior_num_inference_steps", None, "prior_guidance_scale", 5)
    assert prior == PRIOR_DEFAULTS.replace(cfg=5.0)
    with pytest.raises(ValueError, match="prior_num_inference_steps must be a positive integer"):
        pipe(PROMPTS[0], prior_num_inference_steps=0)
    with pytest.raises(ValueError, match="decoder_guidance_scale must be a finite number"):
        pipe(PROMPTS[0], decoder_guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(PROMPTS[0], output_type="pt")
    with pytest.raises(TypeError, match=r"\['images'\].*pipe.image_variation"):
        pipe(PROMPTS[0], images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="torch generators"):
        pipe(PROMPTS[0], generator=object())
    with pytest.raises(ValueError, match="latents and prior_latents"):
        pipe(PROMPTS[0], latents=np.zeros((1, 4, 5, 16)), prior_latents=np.zeros((1, 4, 5, 16)))
    noise = np.random.default_rng(0).standard_normal((1, 4, 5, 16)).astype(np.float32)
    np.testing.assert_array_equal(diffusers_call.as_nhwc("latents", noise.transpose(0, 3, 1, 2), noise.shape), noise)


def test_diffusers_style_step_callbacks_observe_each_stage():
    calls = []
    prior_fn = lambda pipe, i, t, kwargs: calls.append(("C", pipe, i, t, sorted(kwargs)))  # noqa: E731
    decoder_fn = lambda pipe, i, t, kwargs: calls.append(("B", pipe, i, t, sorted(kwargs)))  # noqa: E731
    callback, x0 = diffusers_call.step_callback("pipe", PRIOR, DECODER, prior_fn, ["x0"], decoder_fn, None)
    assert x0
    for stage, step in (("Stage C", 1), ("Stage C", 2), ("Stage B", 1)):
        callback(StepEvent(stage, step, 2, np.zeros((1, 4, 5, 16))))
    assert calls == [("C", "pipe", 0, 1.0, ["x0"]), ("C", "pipe", 1, 0.5, ["x0"]), ("B", "pipe", 0, 1.0, [])]
    changing, _ = diffusers_call.step_callback("pipe", PRIOR, DECODER, None, None,
                                               lambda pipe, i, t, kwargs: {"latents": 0}, None)
    with pytest.raises(ValueError, match="callback_on_step_end returned changed tensors"):
        changing(StepEvent("Stage B", 1, 2, None))
    with pytest.raises(ValueError, match=r"\['latents'\] cannot be handed out"):
        diffusers_call.step_callback("pipe", PRIOR, DECODER, prior_fn, ["latents"], None, None)


# ---- numerical failures --------------------------------------------------------------------------
def test_nan_in_stage_b_weights_raises_naming_the_stage(pipe, single):
    single(PROMPTS[0], 0)  # the batch-1 programs exist: poisoning the weights needs no recompilation
    runner = pipe.decoder
    clean = runner.state
    model = nnx.merge(runner.graphdef, clean, copy=True)  # poison a copy: `clean` stays clean
    var = next(v for k, v in named_variables(model).items() if k.endswith("weight") and v.ndim == 4)
    var.set_value(jax.device_put(np.full(var.shape, np.nan, var.dtype), var.get_value().sharding))
    runner.state = nnx.state(model)
    try:
        with pytest.raises(FloatingPointError, match="Stage B produced NaN"):
            t2i(pipe, PROMPTS[0], 0)
    finally:
        runner.state = clean
    np.testing.assert_array_equal(t2i(pipe, PROMPTS[0], 0).images, single(PROMPTS[0], 0).images)
