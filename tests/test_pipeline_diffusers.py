"""End-to-end parity with diffusers' Stable Cascade pipelines (diffusers 0.42.1) at tiny random configs.

diffusers' ``StableCascadePriorPipeline`` + ``StableCascadeDecoderPipeline`` (StableCascadeUNet prior and
decoder, PaellaVQModel, CLIPTextModelWithProjection, DDPMWuerstchenScheduler), every parameter randomised
and ``.eval()``, are saved in their own formats and converted by our converter; our
``StableCascadePipeline`` is built from the converted models. Both run the same prompts with the SAME
initial latents and per-step noise (our seeded draws, injected into diffusers through ``latents=`` and
by replacing the scheduler's ``randn_tensor``), float32.

How the comparison is made: our pipeline's own prompt handling, text conditioning (encoding of "" for
the unconditional branch, zero image embeddings, zero EfficientNet latents), batching and Stage A
decode run unchanged; only its per-stage sampling runner is replaced by ``pipeline_testing.LoopRunner``,
which runs our sampler (``cascade_jax.diffusion.sample_steps``: our DDPM step, CFG, undiffuse) with
diffusers' schedule. tests/test_pipeline.py checks that LoopRunner in official mode equals the
compiled StageRunner, and tests/test_diffusion_* check the official GDF behaviour.

Differences between the official sampling (our default) and diffusers' pipelines, each shown below
to change the result:
 1. Noise condition: diffusers feeds the network r = t, so 1.0 at the first step; the official code
    feeds r = CosineTNoiseCond of the shifted, clamped log-SNR, 0.99358 at t = 1 (at other steps the
    two agree to float rounding when shift = 1). The sinusoidal embedding scales r by 10^4, so the first
    step's embedding is unrelated between the two.
 2. Resolution shift: none in diffusers; the official Stage C uses shift 2 (every r and level moves).
 3. CFG rescale: none in diffusers (plain lerp(uncond, cond, w)); official rescales by the std ratio with
    cfg_rho 0.7 (we use each image's std, the official code the batch's; equal at batch 1).
 4. Stage B guidance: diffusers' decoder defaults to guidance_scale 0 (no CFG at all), official 1.1.
    (Step defaults: prior 20 / decoder 10 in both; the combined pipeline uses 60 / 12.)
 5. Last step: diffusers' DDPMWuerstchenScheduler draws noise on the last step but multiplies it by 0
    (prev_t == 0); the official DDPM adds sigma * noise on every step.
 6. Result of a stage: diffusers returns the last x (at alpha_cumprod 0.9999, i.e. ~1% noise-level
    mix of the predicted epsilon); the official sampler returns the last predicted x0.
 7. Stage A scale: diffusers decodes vqgan.decode(latents * 0.3764) (its config's scale_factor); the
    official code uses 0.43 (Stage B was trained on latents / 0.43). Our converter keeps 0.43 for a
    diffusers vqgan folder unless told otherwise.
 8. Stage B latent size: diffusers sizes it from the Stage C latent, int(h_c * 10.67), not H / 4:
    720x1280 gives 181x320 (we: 180x320), 136x200 gives 42x53 (we: 34x50); equal when H, W are
    multiples of 128 (and e.g. 128x256 used here).
 9. The DDPM update itself is the same posterior written differently: diffusers
    mu = (x - (1 - alpha) eps / sqrt(1 - acp)) / sqrt(alpha), std^2 = (1 - alpha)(1 - acp_prev)/(1 - acp);
    official x' = a' x0 + sqrt(b'^2 - s^2) eps + s noise with the same s (agree to float rounding), and both
    clamp alpha_cumprod to [1e-4, 0.9999] with the cosine schedule (s = 0.008).
Agreeing: tokenization (max_length 77), clip_text = last hidden state before the final LayerNorm,
pooled = projected end-of-text embedding as (B, 1, D), unconditional = encoding of "" (not zeros),
zero clip_img / effnet for the unconditional branch, batch order [cond, uncond], lerp for guidance.
(diffusers' bf16 r-embedding precision issue does not show in float32.)

Bounds (max|Δ| / max|ref|, float32): 1e-5 for the Stage C and Stage B latents (measured 1.9e-6 and 7.2e-7),
1e-4 for the decoded float images (measured 4.2e-7), uint8 pixels within 1 level.
"""

from __future__ import annotations

import dataclasses
import inspect

import diffusers
import diffusers.schedulers.scheduling_ddpm_wuerstchen as wuerstchen_scheduler
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
from flax import nnx
from helpers import nchw_to_nhwc, nhwc_to_nchw, randomize_torch_module, relative_error
from pipeline_testing import DIFFUSERS, OFFICIAL, LoopMode, LoopRunner, diffusers_settings
from test_diffusers_unet import DECODER, LEVEL  # the same tiny decoder as the UNet parity test

import cascade_jax
from cascade_jax.diffusion import SamplerSettings
from cascade_jax.data.clip_tokenizer import CLIPTokenizer, openai_bpe_path, write_tokenizer_folder_from_openai_bpe
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline, stage_b_latent_hw
from cascade_jax.pipelines.cascade import jitted_call
from cascade_jax.weights.convert import convert_checkpoint
from cascade_jax.weights.diffusers_vq import stage_a_config_from_paella

TOL = 1e-4  # decoded images (float, before uint8)
# Latents: measured 1.9e-6 (Stage C) and 7.2e-7 (Stage B). The bound sits well under the smallest documented
# differences (the last-step noise and x-vs-x0 change these random-weight latents by 7e-5 to 9e-5 relative).
LATENT_TOL = 1e-5
VISIBLE = 3 * LATENT_TOL  # a documented difference must change the result by more than this
H, W = 128, 256  # Stage C 3x6, Stage B 32x64 in both implementations (see difference 8)
PROMPTS = ["a lighthouse on a cliff", "two cats"]
PRIOR_STEPS, DECODER_STEPS = 3, 2
# The settings under which our pipeline reproduces diffusers (with LoopMode DIFFUSERS).
PRIOR_AS_DIFFUSERS = PRIOR_DEFAULTS.replace(steps=PRIOR_STEPS, cfg=4.0, shift=1.0, cfg_rho=0.0)
DECODER_AS_DIFFUSERS = DECODER_DEFAULTS.replace(steps=DECODER_STEPS, cfg=1.1, shift=1.0, cfg_rho=0.0)

PRIOR = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=64,
             block_out_channels=(64, 64), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 2),
             up_num_layers_per_block=(2, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
             block_types_per_layer=(LEVEL, LEVEL), clip_text_in_channels=32, clip_text_pooled_in_channels=32,
             clip_image_in_channels=24, clip_seq=4, dropout=(0.1, 0.1), timestep_conditioning_type=("sca", "crp"),
             switch_level=(False,))
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
VQ = dict(levels=2, bottleneck_blocks=2, embed_dim=32, latent_channels=4, num_vq_embeddings=64)
OUTPUT_SCALE = 1 / 500


# ---- building both sides --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_side(tmp_path_factory):
    """diffusers' two pipelines with random weights, and their components saved as a diffusers download
    (prior/, decoder/, vqgan/, text_encoder/, tokenizer/)."""
    root = tmp_path_factory.mktemp("diffusers_download")
    bpe = openai_bpe_path()
    if bpe is None:
        pytest.skip("open_clip_torch (which ships the CLIP BPE merges) is not installed")
    write_tokenizer_folder_from_openai_bpe(bpe, root / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    text_encoder = randomize_torch_module(
        transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)), seed=1)
    prior = randomize_torch_module(StableCascadeUNet(**PRIOR), seed=2)
    decoder = randomize_torch_module(StableCascadeUNet(**DECODER), seed=3)
    vqgan = randomize_torch_module(PaellaVQModel(**VQ), seed=4)
    with torch.no_grad():  # random U-Nets give latents of a few hundred: keep most decoded pixels inside [0, 1]
        vqgan.out_block[0].weight.mul_(OUTPUT_SCALE)
        vqgan.out_block[0].bias.mul_(OUTPUT_SCALE).add_(0.5)
    for module, folder in ((text_encoder, "text_encoder"), (prior, "prior"), (decoder, "decoder"), (vqgan, "vqgan")):
        module.save_pretrained(root / folder)
    scheduler = diffusers.DDPMWuerstchenScheduler()
    prior_pipe = diffusers.StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior,
                                                      scheduler=scheduler)
    decoder_pipe = diffusers.StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer,
                                                          text_encoder=text_encoder, scheduler=scheduler, vqgan=vqgan)
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)
    return prior_pipe, decoder_pipe, root


@pytest.fixture(scope="module")
def ours(torch_side, tmp_path_factory):
    """Our pipeline from the converted diffusers components; Stage A with diffusers' scale 0.3764."""
    _, decoder_pipe, root = torch_side
    out = tmp_path_factory.mktemp("converted")
    convert = lambda model, config, folder: cascade_jax.load_model(
        convert_checkpoint(model, config, root / folder, out / folder))
    stage_a_config = stage_a_config_from_paella(dict(decoder_pipe.vqgan.config), scale_factor=None)
    pipe = StableCascadePipeline(
        stage_c=convert("stage_c", None, "prior"), stage_b=convert("stage_b", None, "decoder"),
        stage_a=convert("stage_a", stage_a_config, "vqgan"), text_encoder=convert("clip_text", None, "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"))
    assert pipe.stage_a.scale_factor == decoder_pipe.vqgan.config.scale_factor == 0.3764
    return pipe


@pytest.fixture(scope="module")
def official_stage_a(ours):
    """The same Stage A weights with the official scale factor 0.43 (what our converter gives a diffusers
    vqgan folder by default: see test_from_pretrained_reads_the_diffusers_download)."""
    model = nnx.clone(ours.stage_a)
    model.scale_factor = 0.43
    return model


class Sampled:
    """Our pipeline run with LoopRunners of the given mode in place of its stage runners."""

    def __init__(self, pipe, mode: LoopMode, prior: SamplerSettings, decoder: SamplerSettings):
        runners = pipe.prior, pipe.decoder
        self.prior_loop = LoopRunner("Stage C", runners[0], mode)
        self.decoder_loop = LoopRunner("Stage B", runners[1], mode)
        pipe.prior, pipe.decoder = self.prior_loop, self.decoder_loop
        try:
            self.out = pipe.text_to_image(PROMPTS, height=H, width=W, seed=0, prior=prior, decoder=decoder)
        finally:
            pipe.prior, pipe.decoder = runners
        # The float images behind out.images (uint8), to compare with diffusers' float output.
        self.decoded = np.asarray(jitted_call(pipe.stage_a, jnp.asarray(self.out.stage_b_latents), method="decode"))


@pytest.fixture(scope="module")
def as_diffusers(ours):
    return Sampled(ours, DIFFUSERS, PRIOR_AS_DIFFUSERS, DECODER_AS_DIFFUSERS)


class InjectedNoise:
    """Replaces the scheduler's randn_tensor with our per-step noise (NHWC -> NCHW), step by step."""

    def __init__(self, monkeypatch):
        self.queue = []
        monkeypatch.setattr(wuerstchen_scheduler, "randn_tensor", self._next)

    def load(self, noise):
        self.queue = [torch.from_numpy(nhwc_to_nchw(step).copy()) for step in noise]

    def _next(self, shape, **kwargs):
        step = self.queue.pop(0)
        assert tuple(step.shape) == tuple(shape), (step.shape, shape)
        return step


def run_diffusers(torch_side, sampled: Sampled, monkeypatch, decoder_guidance=1.1):
    """diffusers' prior then decoder, fed the initial latents and per-step noise our run used."""
    prior_pipe, decoder_pipe, _ = torch_side
    (c_call,), (b_call,) = sampled.prior_loop.calls, sampled.decoder_loop.calls
    noise = InjectedNoise(monkeypatch)
    final = {}

    def keep_latents(pipe, step, t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    with torch.no_grad():
        noise.load(c_call.noise)
        embeddings = prior_pipe(PROMPTS, height=H, width=W, num_inference_steps=PRIOR_STEPS, guidance_scale=4.0,
                                latents=torch.from_numpy(nhwc_to_nchw(c_call.x_init).copy())).image_embeddings
        assert noise.queue == []
        noise.load(b_call.noise)
        images = decoder_pipe(embeddings, PROMPTS, num_inference_steps=DECODER_STEPS,
                              guidance_scale=decoder_guidance, output_type="np", callback_on_step_end=keep_latents,
                              latents=torch.from_numpy(nhwc_to_nchw(b_call.x_init).copy())).images
        assert noise.queue == []
    return nchw_to_nhwc(embeddings.numpy()), nchw_to_nhwc(final["latents"].numpy()), images


@pytest.fixture
def diffusers_result(torch_side, as_diffusers, monkeypatch):
    return run_diffusers(torch_side, as_diffusers, monkeypatch)


# ---- parity --------------------------------------------------------------------------------------
def test_tokenizers_agree(torch_side, ours):
    prior_pipe = torch_side[0]
    theirs = prior_pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=77, truncation=True)
    mine = ours.text.tokenizer(PROMPTS + [""])
    np.testing.assert_array_equal(mine["input_ids"], np.asarray(theirs["input_ids"]))
    np.testing.assert_array_equal(mine["attention_mask"], np.asarray(theirs["attention_mask"]))


def test_pipeline_matches_diffusers_under_diffusers_settings(ours, as_diffusers, diffusers_result):
    c_ref, b_ref, images_ref = diffusers_result
    out = as_diffusers.out
    stage_a_alone = np.asarray(jitted_call(ours.stage_a, jnp.asarray(b_ref), method="decode"))
    print(f"max |latent|: Stage C {np.abs(c_ref).max():.0f}, Stage B {np.abs(b_ref).max():.0f} (random U-Nets); "
          f"decoded range [{as_diffusers.decoded.min():.2f}, {as_diffusers.decoded.max():.2f}]")
    assert out.stage_c_latents.shape == c_ref.shape == (2, 3, 6, 16)
    assert out.stage_b_latents.shape == b_ref.shape == (2, 32, 64, 4)
    errors = {"Stage C latents": relative_error(out.stage_c_latents, c_ref),
              "Stage B latents": relative_error(out.stage_b_latents, b_ref),
              "decoded images": relative_error(np.clip(as_diffusers.decoded, 0, 1), images_ref),
              "Stage A alone": relative_error(np.clip(stage_a_alone, 0, 1), images_ref)}
    levels = int(np.abs(out.images.astype(int) - np.round(images_ref * 255).astype(int)).max())
    print("ours (diffusers settings) vs diffusers: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + f", uint8 max {levels} level(s)")
    assert errors["Stage C latents"] <= LATENT_TOL and errors["Stage B latents"] <= LATENT_TOL, errors
    assert errors["decoded images"] <= TOL and errors["Stage A alone"] <= TOL, errors
    assert np.mean((as_diffusers.decoded < 0) | (as_diffusers.decoded > 1)) < 0.05  # few pixels clamped
    assert levels <= 1
    # Not a degenerate agreement: the two prompts and the two images differ.
    assert relative_error(c_ref[0], c_ref[1]) > 0.1 and np.abs(images_ref[0] - images_ref[1]).max() > 0.1


# ---- documented differences ----------------------------------------------------------------------
def test_diffusers_defaults_and_sizes_differ_from_official(torch_side):
    prior_pipe, decoder_pipe, _ = torch_side
    prior_defaults = inspect.signature(type(prior_pipe).__call__).parameters
    decoder_defaults = inspect.signature(type(decoder_pipe).__call__).parameters
    assert prior_defaults["guidance_scale"].default == 4.0 and prior_defaults["num_inference_steps"].default == 20
    assert decoder_defaults["guidance_scale"].default == 0.0  # (4) official Stage B: 1.1
    assert decoder_defaults["num_inference_steps"].default == 10
    assert decoder_pipe.vqgan.config.scale_factor == 0.3764  # (7) official 0.43
    # (8) diffusers' Stage B latent follows the Stage C latent, not the image size.
    for (height, width), theirs in {(720, 1280): (181, 320), (136, 200): (42, 53), (H, W): (32, 64),
                                    (1024, 1024): (256, 256)}.items():
        c_latent = prior_pipe.prepare_latents(1, height, width, 1, torch.float32, "cpu", None, None,
                                              prior_pipe.scheduler)
        b_latent = decoder_pipe.prepare_latents(1, c_latent, 1, torch.float32, "cpu", None, None,
                                                decoder_pipe.scheduler)
        assert tuple(b_latent.shape[-2:]) == theirs
        assert stage_b_latent_hw(height, width) == ((height // 4, width // 4))


def test_noise_conditions_fed_to_the_network(torch_side):
    """(1), (2): what r each step feeds the network, for Stage C's 3 steps."""
    scheduler = torch_side[0].scheduler
    scheduler.set_timesteps(3)
    theirs = scheduler.timesteps[:-1].numpy()  # the pipelines feed timestep_ratio = t
    official = SamplerSettings(steps=3, cfg=4.0, shift=2.0).plan()
    unshifted = SamplerSettings(steps=3, cfg=4.0, shift=1.0).plan()
    diffusers_r = diffusers_settings(SamplerSettings(steps=3, cfg=4.0, shift=1.0)).plan().r
    print(f"r fed to the network: diffusers {theirs}, official shift 1 {unshifted.r}, official shift 2 "
          f"{official.r}")
    np.testing.assert_array_equal(diffusers_r, theirs)  # what our diffusers-mode LoopRunner feeds
    np.testing.assert_allclose(unshifted.r[0], 0.99358, atol=1e-5)
    np.testing.assert_allclose(unshifted.r[1:], diffusers_r[1:], rtol=1e-5)  # equal but for the first step
    assert np.all(np.abs(official.r[1:] - diffusers_r[1:]) > 0.05)  # shift 2 moves every level


def test_each_difference_changes_the_result(ours, official_stage_a, as_diffusers, diffusers_result, torch_side,
                                            monkeypatch):
    """From diffusers' behaviour to the official one, one difference at a time; each changes the output.

    The noise of every run is the same (same seeds), so a change comes from the sampling rule alone."""
    c_ref, b_ref, images_ref = diffusers_result
    steps = [
        ("(1) r from the log-SNR", dict(mode=dataclasses.replace(DIFFUSERS, r_is_t=False))),
        ("(5) noise on the last step", dict(mode=LoopMode(r_is_t=False, last_step_noise=True, return_x=True))),
        ("(6) last x0 as the result", dict(mode=OFFICIAL)),
        ("(3) cfg_rho 0.7", dict(mode=OFFICIAL, rho=0.7)),
        ("(2) Stage C shift 2", dict(mode=OFFICIAL, rho=0.7, shift=2.0)),
    ]
    previous = as_diffusers
    changes = {}
    for name, change in steps:
        prior = dataclasses.replace(PRIOR_AS_DIFFUSERS, cfg_rho=change.get("rho", 0.0), shift=change.get("shift", 1.0))
        decoder = dataclasses.replace(DECODER_AS_DIFFUSERS, cfg_rho=change.get("rho", 0.0))
        run = Sampled(ours, change["mode"], prior, decoder)
        changes[name] = (relative_error(run.out.stage_c_latents, previous.out.stage_c_latents),
                         relative_error(run.out.stage_b_latents, previous.out.stage_b_latents))
        previous = run
    # (7) Stage A's scale factor: the same Stage B latents decoded with the official 0.43.
    decoded_official = np.asarray(jitted_call(official_stage_a, jnp.asarray(b_ref), method="decode"))
    changes["(7) Stage A scale 0.43"] = (0.0, relative_error(np.clip(decoded_official, 0, 1), images_ref))
    # (4) diffusers' decoder default (guidance 0: no CFG) against 1.1, in diffusers itself.
    _, b_no_cfg, _ = run_diffusers(torch_side, as_diffusers, monkeypatch, decoder_guidance=0.0)
    changes["(4) Stage B guidance 0 vs 1.1"] = (0.0, relative_error(b_no_cfg, b_ref))
    official_vs_diffusers = (relative_error(previous.out.stage_c_latents, c_ref),
                             relative_error(previous.out.stage_b_latents, b_ref))
    print("change of (Stage C, Stage B/images) per difference: "
          + "; ".join(f"{k}: {c:.2e}, {b:.2e}" for k, (c, b) in changes.items())
          + f"; all official vs diffusers: {official_vs_diffusers[0]:.2e}, {official_vs_diffusers[1]:.2e}")
    for name, (c, b) in changes.items():
        assert max(c, b) > VISIBLE, f"{name} made no visible difference"
    assert min(official_vs_diffusers) > 100 * VISIBLE


def test_from_pretrained_reads_the_diffusers_download(torch_side, ours, tmp_path, monkeypatch):
    """prior/, decoder/, vqgan/, text_encoder/, tokenizer/ (diffusers' layout) load with their config.json;
    Stage A gets the official scale factor."""
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    loaded = StableCascadePipeline.from_pretrained(torch_side[2], dtype="float32")
    assert loaded.stage_a.scale_factor == 0.43 and loaded.effnet is None and loaded.previewer is None
    pairs = [(nnx.merge(loaded.prior.graphdef, loaded.prior.state), nnx.merge(ours.prior.graphdef, ours.prior.state)),
             (nnx.merge(loaded.decoder.graphdef, loaded.decoder.state),
              nnx.merge(ours.decoder.graphdef, ours.decoder.state)),
             (nnx.merge(loaded.text._graphdef, loaded.text._state), nnx.merge(ours.text._graphdef, ours.text._state))]
    for got, want in pairs:
        got, want = nnx.to_flat_state(nnx.state(got)), dict(nnx.to_flat_state(nnx.state(want)))
        for path, value in got:
            np.testing.assert_array_equal(np.asarray(value.get_value()), np.asarray(want[path].get_value()))
