"""GDF pieces (schedule, scaler, targets, noise conditioning, loss weights, diffuse) against the
official GDF fixture and closed-form re-derivations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.diffusion import (
    GDF,
    adaptive_bucket_index,
    adaptive_loss_weight,
    adaptive_loss_weight_init,
    adaptive_loss_weight_update,
    cosine_logsnr,
    cosine_logsnr_limits,
    cosine_t_noise_cond,
    get_target,
    p2_loss_weight,
    torch_linspace,
    vp_scalers,
)
from helpers import fixture, nchw_to_nhwc, relative_error

TOL = 1e-6  # float32 closed forms; the fixture's own bound is 1e-4


@pytest.fixture(scope="module")
def gdf_io(fixtures_dir):
    return fixture(fixtures_dir, "gdf")[1]


def test_sampler_times_are_torch_linspace(gdf_io):
    np.testing.assert_array_equal(torch_linspace(1.0, 0.0, 7), gdf_io["r_range"])
    assert torch_linspace(0.8, 0.0, 5)[0] == np.float32(0.8) and torch_linspace(0.8, 0.0, 5)[-1] == 0


def test_shifted_schedule_matches_fixture(gdf_io):
    logsnr = cosine_logsnr(gdf_io["r_range"], shift=2.0)
    a, b = vp_scalers(logsnr)
    assert relative_error(logsnr, gdf_io["logsnr"]) < TOL
    assert relative_error(cosine_t_noise_cond(logsnr), gdf_io["noise_cond"]) < TOL
    assert relative_error(a, gdf_io["a"]) < TOL
    assert relative_error(b, gdf_io["b"]) < TOL


def test_shift_lowers_logsnr_and_clamps_to_unshifted_range():
    low, high = cosine_logsnr_limits()
    t = jnp.array([1.0, 0.5, 0.0])
    unshifted, shifted = cosine_logsnr(t), cosine_logsnr(t, shift=2.0)
    np.testing.assert_allclose(float(low), math.log(1e-4 / (1 - 1e-4)), rtol=1e-5)
    assert shifted[0] == low  # -9.21 - 2 ln 2 is clamped back up: t=1 stays pure noise
    np.testing.assert_allclose(shifted[1:], unshifted[1:] - 2 * math.log(2.0), rtol=1e-6)
    assert unshifted[2] == high


def test_noise_cond_inverts_the_unclamped_schedule():
    t = jnp.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(cosine_t_noise_cond(cosine_logsnr(t)), t, atol=2e-5)
    # Clamped at t=1: the network sees 0.99358 there, whatever the shift.
    np.testing.assert_allclose(cosine_t_noise_cond(cosine_logsnr(1.0, shift=2.0)), 0.9935832, atol=1e-7)


def test_vp_scalers_preserve_variance():
    a, b = vp_scalers(jnp.linspace(-10, 10, 21))
    np.testing.assert_allclose(a**2 + b**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.log(a**2 / b**2), np.linspace(-10, 10, 21), atol=1e-3)


@pytest.mark.parametrize("name", ["epsilon", "x0", "v"])
def test_targets_invert(name):
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 2, 3, 4, 5)).astype(np.float32)
    a, b = (v[:, None, None, None] for v in vp_scalers(jnp.array([-1.5, 2.0])))
    target = get_target(name)
    noised, pred = x0 * a + eps * b, target.target(x0, eps, a, b)
    assert relative_error(target.to_x0(noised, pred, a, b), x0) < 1e-5
    assert relative_error(target.to_epsilon(noised, pred, a, b), eps) < 1e-5
    if name == "v":  # v = a·ε − b·x0
        assert relative_error(pred, a * eps - b * x0) < TOL


def test_diffuse_matches_fixture(gdf_io):
    out = GDF().diffuse(nchw_to_nhwc(gdf_io["train_x0"]), epsilon=nchw_to_nhwc(gdf_io["train_eps"]),
                        t=gdf_io["train_t"])
    assert relative_error(out.noised, nchw_to_nhwc(gdf_io["train_noised"])) < TOL
    assert relative_error(out.target, nchw_to_nhwc(gdf_io["train_target"])) < TOL
    assert relative_error(out.logsnr, gdf_io["train_logsnr"]) < TOL
    assert relative_error(out.noise_cond, gdf_io["train_noise_cond"]) < TOL
    assert relative_error(out.loss_weight, gdf_io["train_loss_weight"]) < TOL


def test_undiffuse_recovers_x0_and_epsilon():
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 2, 4, 4, 3)).astype(np.float32)
    for target in ("epsilon", "x0", "v"):
        gdf = GDF(target=target)
        out = gdf.diffuse(x0, eps, t=jnp.array([0.3, 0.7]))
        pred_x0, pred_eps = gdf.undiffuse(out.noised, out.logsnr, out.target)
        assert relative_error(pred_x0, x0) < 1e-5 and relative_error(pred_eps, eps) < 1e-5


def test_diffuse_draws_missing_inputs_and_offset_noise():
    x0 = jnp.zeros((4, 3, 3, 2))
    with pytest.raises(ValueError, match="key"):
        GDF().diffuse(x0)
    out = GDF().diffuse(x0, key=jax.random.key(0))
    assert out.noise_cond.shape == (4,) and bool(jnp.all((out.noise_cond > 0) & (out.noise_cond <= 1)))
    # Offset noise: one constant per (sample, channel), NHWC (B, 1, 1, C), scaled by offset_noise.
    eps, offset = jnp.zeros_like(x0), jnp.arange(8.0).reshape(4, 1, 1, 2)
    out = GDF(offset_noise=0.1).diffuse(x0, eps, t=jnp.full((4,), 0.5), offset=offset)
    np.testing.assert_allclose(out.epsilon, jnp.broadcast_to(offset * 0.1, x0.shape), rtol=1e-6)
    np.testing.assert_allclose(out.target, out.epsilon)  # epsilon target includes the offset
    drawn = GDF(offset_noise=0.1).diffuse(x0, eps, t=jnp.full((4,), 0.5), key=jax.random.key(1)).epsilon
    assert float(jnp.std(drawn[:, 0, 0, :])) > 0 and float(jnp.max(jnp.std(drawn, axis=(1, 2)))) < 1e-7


def test_p2_loss_weight_and_loss_shift():
    logsnr = jnp.array([-3.0, 0.0, 2.5])
    np.testing.assert_allclose(p2_loss_weight(logsnr), 1 / (1 + np.exp(logsnr)), rtol=1e-6)
    np.testing.assert_allclose(p2_loss_weight(logsnr, k=2.0, gamma=0.5, s=0.5),
                               (2 + np.exp(0.5 * logsnr)) ** -0.5, rtol=1e-6)
    np.testing.assert_allclose(p2_loss_weight(logsnr, shift=2.0), 1 / (1 + 4 * np.exp(logsnr)), rtol=1e-6)


def test_adaptive_weight_starts_uniform_and_uses_official_buckets():
    state = adaptive_loss_weight_init()
    assert state.bucket_ranges.shape == (299,) and state.bucket_losses.shape == (300,)
    # torch.searchsorted (left): below the first boundary -> 0, above the last -> 299, a value
    # equal to a boundary goes to that boundary's index.
    logsnr = jnp.array([-11.0, 11.0, float(state.bucket_ranges[10]), float(state.bucket_ranges[10]) + 1e-3])
    np.testing.assert_array_equal(adaptive_bucket_index(state, logsnr), [0, 299, 10, 11])
    np.testing.assert_array_equal(adaptive_loss_weight(state, logsnr), np.ones(4))
    assert GDF(loss_weight="adaptive").weight(logsnr, loss_state=state).shape == (4,)
    with pytest.raises(ValueError, match="loss_state"):
        GDF(loss_weight="adaptive").weight(logsnr)


def test_adaptive_update_is_an_ema_per_bucket_and_last_duplicate_wins():
    state = adaptive_loss_weight_init(buckets=6)  # boundaries -10, -5, 0, 5, 10
    logsnr = jnp.array([-7.0, 1.0, 2.0, 3.0])  # buckets 1, 3, 3, 3
    loss = jnp.array([3.0, 10.0, 20.0, 30.0])
    new = adaptive_loss_weight_update(state, logsnr, loss, beta=0.9)
    # Each sample reads the old value; the last sample of a shared bucket is the one written,
    # exactly what the official in-place ``bucket_losses[idx] = ...`` leaves on the CPU.
    np.testing.assert_allclose(new.bucket_losses, [1, 0.9 + 0.3, 1, 0.9 + 3.0, 1, 1], rtol=1e-6)
    np.testing.assert_array_equal(new.bucket_ranges, state.bucket_ranges)
    np.testing.assert_allclose(adaptive_loss_weight(new, logsnr), 1 / np.array([1.2, 3.9, 3.9, 3.9]), rtol=1e-6)
    np.testing.assert_allclose(adaptive_loss_weight(new, logsnr, weight_range=(0.5, 0.8)), [0.8, 0.5, 0.5, 0.5])
    # Repeated updates converge to the bucket's loss.
    new = jax.lax.fori_loop(0, 200, lambda _, st: adaptive_loss_weight_update(
        st, jnp.array([-7.0]), jnp.array([2.0]), beta=0.9), new)
    np.testing.assert_allclose(new.bucket_losses[1], 2.0, rtol=1e-5)


def test_adaptive_state_threads_through_a_jitted_train_step():
    """The state is a pytree a jitted step returns updated; no gradient flows into it."""
    gdf = GDF(loss_weight="adaptive")
    x0 = jnp.ones((3, 2, 2, 1))

    @jax.jit
    def step(param, state, key):
        def loss_fn(p):
            out = gdf.diffuse(x0, key=key, loss_state=state)
            per_sample = jnp.mean((out.noised * p - out.target) ** 2, axis=(1, 2, 3))
            return jnp.mean(per_sample * out.loss_weight), (out.logsnr, per_sample)

        (loss, (logsnr, per_sample)), grad = jax.value_and_grad(loss_fn, has_aux=True)(param)
        return grad, adaptive_loss_weight_update(state, logsnr, per_sample)

    state = adaptive_loss_weight_init()
    grad, state2 = step(jnp.float32(0.5), state, jax.random.key(0))
    assert np.isfinite(float(grad))
    assert int(jnp.sum(state2.bucket_losses != 1)) in (1, 2, 3)
    assert jax.tree.structure(state2) == jax.tree.structure(state)
