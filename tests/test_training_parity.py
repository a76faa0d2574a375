"""Training-step parity: for the same weights, conditioning, noise and t, the loss and every parameter
gradient of our Stage C / Stage B training loss equal a PyTorch reference (diffusers'
StableCascadeUNet with the same weights + the official GDF training math written in torch here),
for the P2 and the adaptive loss weight; the adaptive buckets' update matches too."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import nchw_to_nhwc, nhwc_to_nchw, relative_error

from cascade_jax.diffusion import AdaptiveLossWeightState, adaptive_loss_weight_init, adaptive_loss_weight_update
from cascade_jax.nn.params import named_variables
from cascade_jax.training.losses import denoising_loss, make_gdf, pyramid_noise
from cascade_jax.weights.diffusers_unet import DIFFUSERS_STAGE_B, DIFFUSERS_STAGE_C
from cascade_jax.weights.layout import ours_to_torch

torch = pytest.importorskip("torch")
from test_diffusers_unet import DECODER, LEVEL, PRIOR, converted, random_diffusers_unet  # noqa: E402

# Smaller than the forward-parity configs (compile time), still with the switch-level rescale,
# repeat mappers and dropout configured (off: eval mode on both sides).
PRIOR_SMALL = {**PRIOR, "block_out_channels": (32, 32), "conditioning_dim": 32, "down_num_layers_per_block": (1, 1),
               "up_num_layers_per_block": (1, 1), "up_blocks_repeat_mappers": (1, 2)}
DECODER_SMALL = {**DECODER, "block_out_channels": (16, 32), "conditioning_dim": 32, "num_attention_heads": (0, 2),
                 "down_num_layers_per_block": (1, 1), "up_num_layers_per_block": (1, 1),
                 "down_blocks_repeat_mappers": (1, 1), "up_blocks_repeat_mappers": (2, 1),
                 "block_types_per_layer": (LEVEL[:2], LEVEL), "dropout": (0.0, 0.1)}

PARITY = 1e-4  # max|Δ| / max|ref|, per tensor


def torch_gdf_loss(model_fn, x0, t, epsilon, bucket_losses=None, bucket_ranges=None):
    """The official GDF training math (CosineSchedule(clamp_range=[1e-4, 0.9999]), VPScaler,
    EpsilonTarget, CosineTNoiseCond, P2LossWeight / AdaptiveLossWeight), in torch."""
    s = torch.tensor([0.008])
    min_var = torch.cos(s / (1 + s) * math.pi * 0.5) ** 2

    def logsnr(t):
        var = torch.cos((s + t) / (1 + s) * math.pi * 0.5).clamp(0, 1) ** 2 / min_var
        var = var.clamp(0.0001, 0.9999)
        return (var / (1 - var)).log()

    limits = logsnr(torch.tensor([1.0, 0.0])).tolist()
    lsnr = logsnr(t.clamp(0, 1)).clamp(*limits)
    a2 = lsnr.sigmoid()
    a, b = a2.sqrt().view(-1, 1, 1, 1), (1 - a2).sqrt().view(-1, 1, 1, 1)
    noised, target = x0 * a + epsilon * b, epsilon
    noise_cond = ((lsnr.sigmoid().clamp(0, 1) * min_var) ** 0.5).acos() / (math.pi * 0.5) * (1 + s) - s
    if bucket_losses is None:
        weight = (1.0 + lsnr.exp()) ** -1.0
    else:
        weight = (1 / bucket_losses[torch.searchsorted(bucket_ranges, lsnr)]).clamp(1e-7, 1e7)
    pred = model_fn(noised, noise_cond)
    loss = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])
    return (loss * weight).mean(), loss, lsnr, noise_cond


def torch_bucket_update(bucket_losses, bucket_ranges, lsnr, loss, beta=0.99):
    losses = bucket_losses.clone()
    index = torch.searchsorted(bucket_ranges, lsnr)
    losses[index] = losses[index] * beta + loss.detach() * (1 - beta)
    return losses


def grads_by_official_key(reference, fmt) -> dict:
    grads = {k: p.grad.numpy() for k, p in reference.named_parameters()}
    return {key: np.asarray(recipe.combine([grads[s] for s in recipe.sources]))
            for key, recipe in fmt.plan(set(grads)).items()}


def our_losses_and_grads(model, call, x0, t, epsilon, loss_state):
    """{"p2": ..., "adaptive": ...} -> (loss, LossAux, gradients by official key in torch layout), one compile."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, gdf, state):
        generator = nnx.merge(graphdef, params, rest)
        return denoising_loss(lambda noised, cond: call(generator, noised, cond), x0, t, epsilon, gdf, state)

    def both(params, loss_state):
        return {name: jax.value_and_grad(loss_fn, has_aux=True)(params, make_gdf(name == "adaptive"), state)
                for name, state in (("p2", None), ("adaptive", loss_state))}

    layouts = {k: v.get_metadata()["torch_layout"] for k, v in named_variables(model).items()}
    out = {}
    for name, ((loss, aux), grads) in jax.jit(both)(params, loss_state).items():
        out[name] = (float(loss), aux, {k: ours_to_torch(np.asarray(v[...]), layouts[k])
                                        for k, v in named_variables(nnx.merge(graphdef, grads, rest)).items()})
    return out


def random_loss_state(rng) -> AdaptiveLossWeightState:
    state = adaptive_loss_weight_init()
    return state._replace(bucket_losses=jnp.asarray(rng.uniform(0.2, 2.0, 300).astype(np.float32)))


def check(name, weighting, ours, ref_loss, ref_grads):
    loss, our_aux, grads = ours
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    assert set(grads) >= set(ref_grads)
    grad_errs = {k: relative_error(grads[k], v) for k, v in ref_grads.items()}
    worst = max(grad_errs, key=grad_errs.get)
    print(f"{name} {weighting}: loss {loss:.6f} rel err {loss_err:.1e}; gradients of {len(grad_errs)} tensors, "
          f"worst {grad_errs[worst]:.1e} ({worst}) (bound {PARITY:.0e})")
    assert loss_err <= PARITY and grad_errs[worst] <= PARITY
    return our_aux


def run_both(name, reference, model, torch_call, our_call, x0, t, eps, rng, fmt):
    """Both weightings against torch; the adaptive one starts from random bucket losses."""
    loss_state = random_loss_state(rng)
    buckets = dict(bucket_losses=torch.from_numpy(np.asarray(loss_state.bucket_losses)),
                   bucket_ranges=torch.from_numpy(np.asarray(loss_state.bucket_ranges)))
    refs = {}
    for weighting, torch_args in (("p2", {}), ("adaptive", buckets)):
        reference.zero_grad()
        ref_loss, ref_per_sample, ref_lsnr, ref_cond = torch_gdf_loss(
            torch_call, torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(eps), **torch_args)
        ref_loss.backward()
        refs[weighting] = (float(ref_loss.detach()), ref_per_sample.detach(), ref_lsnr, ref_cond.detach().numpy(),
                           grads_by_official_key(reference, fmt))
    # The noise level enters the network as sin/cos(r·10000): one float32 ulp of r (which our
    # acos/sqrt and torch's may round differently) moves the FiLM gradients by ~1e-3 relative.
    # So our r is checked against torch's here, and the network gets torch's r in both runs.
    x0_ours, eps_ours = jnp.asarray(nchw_to_nhwc(x0)), jnp.asarray(nchw_to_nhwc(eps))
    ours_cond = make_gdf(False).diffuse(x0_ours, eps_ours, jnp.asarray(t)).noise_cond
    ref_cond = refs["p2"][3]
    np.testing.assert_allclose(np.asarray(ours_cond), ref_cond, rtol=0, atol=1e-5)  # acos near 1: ill-conditioned
    shared_cond = jnp.asarray(ref_cond)
    ours = our_losses_and_grads(model, lambda g, noised, _: our_call(g, noised, shared_cond), x0_ours,
                                jnp.asarray(t), eps_ours, loss_state)
    for weighting, (ref_loss, ref_per_sample, ref_lsnr, _, ref_grads) in refs.items():
        aux = check(name, weighting, ours[weighting], ref_loss, ref_grads)
        np.testing.assert_allclose(np.asarray(aux.per_sample_loss), ref_per_sample.numpy(), rtol=PARITY)
    updated = adaptive_loss_weight_update(loss_state, aux.logsnr, aux.per_sample_loss)
    expected = torch_bucket_update(buckets["bucket_losses"], buckets["bucket_ranges"], ref_lsnr, ref_per_sample)
    np.testing.assert_allclose(np.asarray(updated.bucket_losses), expected.numpy(), rtol=1e-6)


@pytest.fixture(scope="module")
def stage_c_pair(tmp_path_factory):
    reference = random_diffusers_unet(PRIOR_SMALL, seed=0)
    return reference, converted("stage_c", reference, tmp_path_factory.mktemp("parity_c"))


@pytest.fixture(scope="module")
def stage_b_pair(tmp_path_factory):
    reference = random_diffusers_unet(DECODER_SMALL, seed=1)
    return reference, converted("stage_b", reference, tmp_path_factory.mktemp("parity_b"))


def test_stage_c_loss_and_gradients_match_torch(stage_c_pair):
    reference, model = stage_c_pair
    rng = np.random.default_rng(10)
    b = 3
    x0, eps = (rng.standard_normal((b, 16, 6, 6)).astype(np.float32) for _ in range(2))
    t = np.clip(1 - rng.uniform(size=b) + 0.001, 0.001, 1).astype(np.float32)
    text, pooled, img = (rng.standard_normal(s).astype(np.float32) for s in ((b, 5, 32), (b, 1, 32), (b, 1, 24)))
    tt = {k: torch.from_numpy(v) for k, v in dict(text=text, pooled=pooled, img=img).items()}

    def torch_call(noised, cond):
        return reference(noised, cond, tt["pooled"], clip_text=tt["text"], clip_img=tt["img"]).sample

    def our_call(generator, noised, cond):
        return generator(noised, cond, jnp.asarray(text), jnp.asarray(pooled), jnp.asarray(img))

    run_both("stage_c", reference, model, torch_call, our_call, x0, t, eps, rng, DIFFUSERS_STAGE_C)


def test_stage_b_loss_and_gradients_match_torch(stage_b_pair):
    reference, model = stage_b_pair
    rng = np.random.default_rng(11)
    b = 2
    x0 = rng.standard_normal((b, 4, 16, 16)).astype(np.float32)
    # The noise is the official pyramid noise (ours, NHWC); torch gets the same values.
    eps = nhwc_to_nchw(np.asarray(pyramid_noise(jax.random.key(3), jnp.asarray(
        rng.standard_normal((b, 16, 16, 4)).astype(np.float32)))))
    t = np.clip(1 - rng.uniform(size=b) + 0.001, 0.001, 1).astype(np.float32)
    effnet, clip = rng.standard_normal((b, 16, 4, 4)).astype(np.float32), rng.standard_normal((b, 1, 32)).astype(
        np.float32)

    def torch_call(noised, cond):
        return reference(noised, cond, torch.from_numpy(clip), effnet=torch.from_numpy(effnet)).sample

    def our_call(generator, noised, cond):
        return generator(noised, cond, jnp.asarray(nchw_to_nhwc(effnet)), jnp.asarray(clip))

    run_both("stage_b", reference, model, torch_call, our_call, x0, t, eps, rng, DIFFUSERS_STAGE_B)


def test_pyramid_noise_matches_official_formula():
    """The official _pyramid_noise (torch, NCHW) with the same octave draws equals ours."""
    b, c, h, w = 2, 4, 32, 24
    base = np.random.default_rng(0).standard_normal((b, h, w, c)).astype(np.float32)
    key = jax.random.key(7)
    ours = np.asarray(pyramid_noise(key, jnp.asarray(base)))
    keys = jax.random.split(key, 10)
    eps, multipliers = torch.from_numpy(nhwc_to_nchw(base)), [1]
    for i in range(1, 10):
        m = 0.75 ** i
        hh = ww = h // (2 ** i)  # the official code takes both sides from size(-2)
        if 1 <= hh <= 16 or 1 <= ww <= 16:
            offset = np.asarray(jax.random.normal(keys[i], (b, hh, ww, c), jnp.float32))
            eps = eps + torch.nn.functional.interpolate(torch.from_numpy(nhwc_to_nchw(offset)), size=(h, w),
                                                        mode="nearest") * m
            multipliers.append(m)
        if hh <= 1 or ww <= 1:
            break
    eps = eps / sum(m ** 2 for m in multipliers) ** 0.5
    np.testing.assert_allclose(ours, nchw_to_nhwc(eps.numpy()), rtol=1e-6, atol=1e-6)
