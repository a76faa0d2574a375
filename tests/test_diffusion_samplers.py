"""Sampler steps and classifier-free guidance against independent float64 numpy re-derivations of
the official formulas (gdf/samplers.py, GDF.sample), and torch.lerp for the guidance lerp."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cascade_jax.diffusion import (
    apply_cfg,
    cfg_active,
    cfg_scales,
    concat_conditions,
    ddim_step,
    ddpm_step,
    get_sampler,
    lcm_step,
    sampling_plan,
)
from cascade_jax.diffusion.guidance import torch_lerp
from helpers import relative_error

TOL = 1e-6  # one float32 step against float64


def _scalers(logsnr):
    a2 = 1 / (1 + np.exp(-np.float64(logsnr)))
    return np.sqrt(a2), np.sqrt(1 - a2)


def _reference_step(x0, eps, noise, logsnr, logsnr_next, sampler, eta):
    """x' from the official definitions, in float64."""
    a, b = _scalers(logsnr)
    a_next, b_next = _scalers(logsnr_next)
    if sampler == "lcm":
        return a_next * x0 + b_next * noise
    sigma = eta * (b_next / b) * np.sqrt(1 - a**2 / a_next**2) if eta > 0 else 0.0
    return a_next * x0 + np.sqrt(b_next**2 - sigma**2) * eps + sigma * noise


@pytest.fixture(scope="module")
def step_inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(4)]  # x, x0, eps, noise


@pytest.mark.parametrize("logsnr,logsnr_next", [(-9.21, -4.04), (-1.4, -0.3), (1.17, 7.82)])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 1.0), ("ddim", 0.0), ("ddim", 0.3), ("lcm", None)])
def test_step_matches_reference(step_inputs, logsnr, logsnr_next, sampler, eta):
    x, x0, eps, noise = step_inputs
    fn = {"ddpm": ddpm_step, "ddim": ddim_step, "lcm": lcm_step}[sampler]
    kwargs = {} if sampler == "lcm" else {"eta": eta}
    ours = fn(x, x0, eps, jnp.float32(logsnr), jnp.float32(logsnr_next), noise, **kwargs)
    ref = _reference_step(x0.astype(np.float64), eps.astype(np.float64), noise.astype(np.float64),
                          np.float32(logsnr), np.float32(logsnr_next), sampler, eta)
    assert relative_error(ours, ref) < TOL


def test_ddpm_is_ddim_with_eta_one_and_ddim_zero_ignores_noise(step_inputs):
    x, x0, eps, noise = step_inputs
    args = (x, x0, eps, jnp.float32(-2.0), jnp.float32(1.0))
    np.testing.assert_array_equal(ddpm_step(*args, noise), ddim_step(*args, noise, eta=1.0))
    np.testing.assert_array_equal(ddim_step(*args, noise), ddim_step(*args, None))
    # Per-sample log-SNR (B,) broadcasts like the official view(-1, 1, 1, 1).
    per_sample = ddpm_step(x, x0, eps, jnp.array([-2.0, -2.0]), jnp.array([1.0, 1.0]), noise)
    np.testing.assert_allclose(per_sample, ddpm_step(*args, noise), rtol=1e-6)
    with pytest.raises(ValueError, match="noise"):
        ddpm_step(*args, None)


def test_get_sampler_defaults_and_errors():
    assert get_sampler("ddpm")[1:] == (1.0, True)
    assert get_sampler("ddim")[1:] == (0.0, False)
    assert get_sampler("ddim", 0.5)[1:] == (0.5, True)
    assert get_sampler("lcm")[2] is True
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="eta"):
        get_sampler("lcm", 1.0)


@pytest.mark.parametrize("weight", [0.3, 1.1, 4.0])
def test_torch_lerp_rounding(weight):
    rng = np.random.default_rng(1)
    start, end = rng.standard_normal((2, 1000)).astype(np.float32) * 10
    expected = torch.lerp(torch.from_numpy(start), torch.from_numpy(end), weight).numpy()
    assert relative_error(torch_lerp(start, end, jnp.float32(weight)), expected) < 1e-7


@pytest.mark.parametrize("per_sample", [False, True])
def test_cfg_rescales_towards_the_conditional_std(per_sample):
    rng = np.random.default_rng(2)
    pred, pred_uncond = rng.standard_normal((2, 3, 4, 4, 2))
    pred = pred * np.array([1.0, 2.0, 0.5])[:, None, None, None]
    axes = (1, 2, 3) if per_sample else None
    guided = pred_uncond + 4.0 * (pred - pred_uncond)
    ratio = pred.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True)
    expected = 0.7 * guided * ratio + 0.3 * guided
    ours = apply_cfg(pred.astype(np.float32), pred_uncond.astype(np.float32), 4.0, 0.7, std_per_sample=per_sample)
    assert relative_error(ours, expected) < 1e-5
    assert relative_error(apply_cfg(pred, pred_uncond, 4.0, 0.0), guided) < 1e-6


def test_guidance_scale_schedule_and_window():
    t = np.array([1.0, 0.75, 0.5, 0.25], np.float32)
    np.testing.assert_allclose(cfg_scales(4.0, t), [4, 4, 4, 4])
    np.testing.assert_allclose(cfg_scales((5.0, 1.0), t), [5, 4, 3, 2])  # (at t=1, at t=0)
    np.testing.assert_allclose(cfg_scales(lambda t: 1 + t, t), [2, 1.75, 1.5, 1.25])
    with pytest.raises(ValueError, match="pair"):
        cfg_scales((1.0, 2.0, 3.0), t)
    # Guidance runs while cfg_t_stop <= t <= cfg_t_start (both inclusive, as official).
    np.testing.assert_array_equal(cfg_active(t, None, 0.5), [True, True, True, False])
    np.testing.assert_array_equal(cfg_active(t, 0.75, None), [False, True, True, True])
    np.testing.assert_array_equal(cfg_active(t, 0.75, 0.5), [False, True, True, False])
    plan = sampling_plan(4, cfg=None)
    assert not plan.cfg_on.any() and plan.r.shape == (4,) and plan.logsnr.shape == (5,)


def test_concat_conditions_defaults_to_zeros():
    cond = {"a": jnp.ones((2, 3)), "nested": [jnp.ones((2, 1)), None]}
    out = concat_conditions(cond, None)
    np.testing.assert_array_equal(out["a"], np.concatenate([np.ones((2, 3)), np.zeros((2, 3))]))
    assert out["nested"][0].shape == (4, 1) and out["nested"][1] is None
    out = concat_conditions({"a": jnp.ones((2, 3))}, {"a": jnp.full((2, 3), 5.0)})
    np.testing.assert_array_equal(out["a"][2:], 5.0)
    with pytest.raises(ValueError, match="same keys"):
        concat_conditions({"a": jnp.ones(1)}, {"b": jnp.ones(1)})
