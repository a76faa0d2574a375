"""What the pipeline does with unusual inputs and the initial noise of both stages:
seeds over the whole uint32 range, settings refused by name, high-bit-depth and transparent images,
sizes honoured or refused in img2img / reconstruct, long prompts. Tiny random cascade, float32, 64x64
(Stage C 2x2, Stage B 16x16) so that each sampled shape compiles in seconds."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from PIL import Image

from cascade_jax.conditioning import PromptTruncatedWarning
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline
from cascade_jax.pipelines.control_request import ControlNetRequest
from cascade_jax.pipelines.images import as_uint8_batch, to_rgb_uint8
from cascade_jax.pipelines.request import SamplingRequest
from cascade_jax.pipelines.stage_runner import _noise, image_keys

S = 64
PRIOR = PRIOR_DEFAULTS.replace(steps=2)
DECODER = DECODER_DEFAULTS.replace(steps=2)
LONG = " ".join(["cat"] * 100)  # 100 CLIP tokens: two windows of 75


@pytest.fixture(scope="module")
def pipe():
    return StableCascadePipeline.random("tiny")


def t2i(pipe, prompt="a red cube", **kwargs):
    return pipe.text_to_image(prompt, height=S, width=S, **{"prior": PRIOR, "decoder": DECODER, **kwargs})


# ---- seeds ------------------------------------------------------------------------------------------
def test_every_uint32_seed_runs_both_stages(pipe):
    """3·2³⁰ and 2³²−1 used to pass Stage C and overflow in Stage B (seed + 2³⁰)."""
    for seed in (3 << 30, (1 << 32) - 1):
        out = t2i(pipe, seed=seed)
        assert out.seeds == [seed] and np.isfinite(out.stage_b_latents).all()


@pytest.mark.parametrize("seed, message", [
    (-1, "seed must be an integer"), (1 << 32, "seed must be an integer"), (1.5, "seed must be an integer"),
    ("7", "seed must be an integer"), (True, "seed must be an integer"), ([-3], r"seeds must be integers"),
    ([1 << 32], r"seeds must be integers"), ([np.int64(5), 2.0], r"seeds must be integers"),
])
def test_seeds_outside_the_documented_range_are_refused(pipe, seed, message):
    count = len(seed) if isinstance(seed, list) else 1
    with pytest.raises(ValueError, match=message):
        pipe.text_to_image(["x"] * count, height=S, width=S, seed=seed, prior=PRIOR, decoder=DECODER)


def test_consecutive_seeds_must_stay_in_range(pipe):
    with pytest.raises(ValueError, match=r"seed \.\. seed \+ 1"):
        pipe.text_to_image("x", height=S, width=S, num_images_per_prompt=2, seed=(1 << 32) - 1)


# ---- initial noise of both stages -------------------------------------------------------------------
def test_initial_noise_of_both_stages_can_be_given(pipe):
    """The documented draws (Stage C: key(seed); Stage B: fold_in(key(seed), 1)) passed in explicitly give
    the very same run; another Stage B start changes only Stage B."""
    base = t2i(pipe, seed=11)
    c_init = _noise(image_keys([11], 0), (2, 2, 16), PRIOR.steps)[0]
    b_init = _noise(image_keys([11], 1), (16, 16, 4), DECODER.steps)[0]
    same = t2i(pipe, seed=11, prior_x_init=np.asarray(c_init), decoder_x_init=np.asarray(b_init))
    np.testing.assert_array_equal(same.stage_c_latents, base.stage_c_latents)
    np.testing.assert_array_equal(same.stage_b_latents, base.stage_b_latents)
    other = t2i(pipe, seed=11, decoder_x_init=np.zeros((1, 16, 16, 4), np.float32))
    np.testing.assert_array_equal(other.stage_c_latents, base.stage_c_latents)
    assert np.abs(other.stage_b_latents - base.stage_b_latents).max() > 1e-3
    with pytest.raises(ValueError, match=r"decoder_x_init must be a float array of shape \(1, 16, 16, 4\)"):
        t2i(pipe, decoder_x_init=np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="prior_x_init holds NaN"):
        t2i(pipe, prior_x_init=np.full((1, 2, 2, 16), np.nan, np.float32))


# ---- settings that cannot work ----------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(shift=0.0), "shift must be a finite number in \\(0.0"), (dict(shift=-1.0), "shift must be"),
    (dict(shift=math.nan), "shift must be"), (dict(shift=math.inf), "shift must be"),
    (dict(cfg=math.nan), "cfg must be"), (dict(cfg=math.inf), "cfg must be"), (dict(cfg=True), "cfg must be"),
    (dict(cfg=(4.0, math.nan)), "cfg must be"), (dict(steps=2.5), "steps must be a positive integer"),
    (dict(steps=True), "steps must be a positive integer"), (dict(steps=0), "steps must be a positive integer"),
    (dict(cfg_rho=math.nan), "cfg_rho must be"), (dict(cfg_std_per_sample=1), "cfg_std_per_sample must be True"),
    (dict(eta=-1.0), "eta must be"), (dict(t_start=0.0), "t_start must be"), (dict(shift=True), "shift must be"),
])
def test_impossible_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        PRIOR.replace(**changes)


def test_other_arguments_are_checked_by_name_before_sampling(pipe):
    image = np.zeros((S, S, 3), np.uint8)
    with pytest.raises(ValueError, match="prior must be a SamplerSettings"):
        t2i(pipe, prior={"steps": 2})
    for flag in ("decode", "callback_x0", "long_prompts"):
        with pytest.raises(ValueError, match=f"{flag} must be True or False"):
            t2i(pipe, **{flag: 1})
    with pytest.raises(ValueError, match="callback must be a function"):
        t2i(pipe, callback="print")
    for strength in (True, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            pipe.image_to_image(image, "x", strength=strength)


# ---- images of other bit depths and with transparency -----------------------------------------------
def test_sixteen_bit_and_float_images_are_scaled_not_clipped():
    ramp16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
    for mode in ("I;16", "I"):
        image = Image.fromarray(ramp16) if mode == "I;16" else Image.fromarray(ramp16.astype(np.int32))
        assert image.mode == mode
        rgb = to_rgb_uint8(image)
        assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb[..., 0], np.round(ramp16 / 65535 * 255).astype(np.uint8))
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    rgb = to_rgb_uint8(Image.fromarray(ramp))
    np.testing.assert_array_equal(rgb[..., 1], np.round(ramp * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"mode F image must hold values in \[0, 1\]"):
        to_rgb_uint8(Image.fromarray(ramp * 3))


def test_transparency_is_composited_on_the_stated_background():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half fully transparent
    rgb = to_rgb_uint8(Image.fromarray(rgba))
    np.testing.assert_array_equal(rgb[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(rgb[3, 3], [255, 255, 255])  # white by default, not the hidden black
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(rgba), background=(0, 0, 255))[3, 3],
                                  [0, 0, 255])
    la = Image.fromarray(np.ascontiguousarray(rgba[..., [0, 3]]))
    np.testing.assert_array_equal(to_rgb_uint8(la)[3, 3], [255, 255, 255])
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((3, 3))
    assert as_uint8_batch(palette)[0, 3, 3].tolist() == [255, 255, 255]


# ---- sizes in img2img and reconstruct ---------------------------------------------------------------
def test_img2img_and_reconstruct_honour_or_refuse_the_size(pipe):
    image = t2i(pipe, seed=1).images[0]
    out = pipe.reconstruct(image, height=S, width=S + 32, decoder=DECODER)
    assert out.images.shape == (1, S, S + 32, 3)
    out = pipe.image_to_image(image, "x", strength=0.5, height=S, width=S + 32, prior=PRIOR, decoder=DECODER)
    assert out.images.shape == (1, S, S + 32, 3)
    for mode in (pipe.reconstruct, lambda im, **kw: pipe.image_to_image(im, "x", **kw)):
        with pytest.raises(ValueError, match="nearest valid size is 64x64"):
            mode(image, height=7, width=S)


# ---- long prompts ------------------------------------------------------------------------------------
def test_long_prompts_warn_when_truncated_and_can_be_encoded_in_windows(pipe):
    text = pipe.text
    assert len(text.tokenizer.encode(LONG, add_special_tokens=False)) > 75
    with pytest.warns(PromptTruncatedWarning, match="tokens; CLIP reads the first 75"):
        truncated = text([LONG])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning with the option, nor for a short prompt
        windows = text([LONG], long_prompts=True)
        short = text(["a red cube"], long_prompts=True)
    assert truncated.clip_text.shape[1] == 77 and windows.clip_text.shape[1] == 2 * 77
    assert short.clip_text.shape[1] == 77
    np.testing.assert_array_equal(windows.clip_text[:, :77], truncated.clip_text)  # window 1 = the truncated prompt
    np.testing.assert_array_equal(windows.clip_text_pooled, truncated.clip_text_pooled)  # pooled from window 1
    # Two prompts that differ only after token 75: the same without the option, different with it.
    other = LONG + " and a small blue boat"
    with pytest.warns(PromptTruncatedWarning):
        np.testing.assert_array_equal(text([other]).clip_text, truncated.clip_text)
    assert np.abs(np.asarray(text([other], long_prompts=True).clip_text - windows.clip_text)).max() > 1e-4
    # Unconditional rows get as many windows (the CFG batch needs one length).
    cond, uncond = text.with_unconditional([LONG], long_prompts=True)
    assert cond.clip_text.shape == uncond.clip_text.shape
    out = t2i(pipe, LONG, long_prompts=True)
    assert np.isfinite(out.stage_b_latents).all()


# ---- one request for the command line and the app ---------------------------------------------------
def test_a_request_samples_as_the_pipeline_call_and_is_refused_by_flag_name(pipe):
    request = SamplingRequest("text2img", prompt="a red cube", height=S, width=S, seed=5, prior={"steps": 2},
                              decoder={"steps": 2})
    checked = request.check()
    settings = checked.settings(pipe)  # the official settings of these random weights, with 2 + 2 steps
    assert settings == (PRIOR, DECODER) and checked.seeds == (5,)
    np.testing.assert_array_equal(checked.run(pipe, settings).images, t2i(pipe, seed=5).images)
    assert SamplingRequest(**{**vars(request), "num_images": 3}).check().seeds == (5, 6, 7)
    meta = checked.metadata(settings, weights="random:tiny")
    assert (meta["mode"], meta["prior"]["steps"], meta["height"], meta["loras"]) == ("text2img", 2, S, [])
    assert (meta["decoder"]["cfg_t_start"], meta["decoder"]["cfg_t_stop"]) == (None, None)  # the guidance interval
    for changes, message in [(dict(mode="sketch"), "unknown mode 'sketch'"),
                             (dict(mode="variation"), "^variation needs --image$"),
                             (dict(num_images=0), "^--num-images must be at least 1"),
                             (dict(seed=(1 << 32) - 1, num_images=2), r"^--seed must be an integer in \[0, 2\*\*32 - 2\]"),
                             (dict(prior={"steps": 0}), "^--prior-steps must be a positive integer"),
                             (dict(decoder={"t_start": 1.5}), "^--decoder-t-start must be"),
                             (dict(decoder={"cfg_t_stop": 1.5}), "^--decoder-cfg-t-stop must be"),
                             (dict(prior={"sampler": "euler"}), "^--prior-sampler: unknown sampler 'euler'"),
                             (dict(decoder={"stepz": 3}), r"unknown decoder setting\(s\) \['stepz'\]"),
                             (dict(height=100), "nearest valid size")]:
        with pytest.raises(ValueError, match=message):
            SamplingRequest(**{**vars(request), **changes}).check()


def test_a_controlnet_request_has_the_official_defaults_and_checks_before_any_model():
    image = np.zeros((64, 96, 3), np.uint8)
    canny = ControlNetRequest("canny", image_array=image)
    upscale = ControlNetRequest("super_resolution", image_array=image)
    assert canny.settings() == (PRIOR_DEFAULTS.replace(cfg=4.0), DECODER_DEFAULTS)
    assert upscale.settings().prior == PRIOR_DEFAULTS.replace(cfg=None)  # super-resolution: no guidance
    assert (canny.check(), upscale.check()) == ((64, 96), (128, 192))
    for request, message in [(ControlNetRequest("inpainting", image_array=image), "inpainting needs --mask"),
                             (ControlNetRequest("canny"), "needs a control image"),
                             (ControlNetRequest("canny", image_array=image, prior_steps=0), "--prior-steps and"),
                             (ControlNetRequest("canny", image_array=image, control_start=20),
                              "control start 20 is past")]:
        with pytest.raises(ValueError, match=message):
            request.check()
