"""The jitted sampling loop against an independent float64 numpy re-derivation of the official
``GDF.sample`` (toy network, injected noise), against its own Python-loop twin, and with NNX models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cascade_jax.diffusion import SamplerSettings, sample, sample_steps, sampling_plan
from helpers import relative_error

B, H, W, C = 2, 3, 4, 4
S = 0.008


def _np_logsnr(t, shift):
    """Official CosineSchedule(clamp_range=[1e-4, 0.9999]) with shift; float64 math, float32 clamps."""
    min_var = np.cos(S / (1 + S) * np.pi / 2) ** 2

    def unshifted(t):
        var = np.clip(np.cos((S + np.clip(t, 0, 1)) / (1 + S) * np.pi / 2), 0, 1) ** 2 / min_var
        var = np.clip(var, np.float32(1e-4), np.float32(0.9999))
        return np.log(var / (1 - var))

    return np.clip(unshifted(np.asarray(t, np.float64)) - 2 * np.log(shift), unshifted(1.0), unshifted(0.0))


def _np_noise_cond(logsnr):
    min_var = np.cos(S / (1 + S) * np.pi / 2) ** 2
    var = 1 / (1 + np.exp(-logsnr))
    return np.clip(np.arccos(np.sqrt(var * min_var)) / (np.pi / 2) * (1 + S) - S, 0, 1)


def _np_scalers(logsnr):
    return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def _np_model(x, r, c):
    return np.tanh(0.7 * x + c[:, None, None, :] * r[:, None, None, None]) + 0.1 * x


def _jax_model(x, r, c):
    return jnp.tanh(0.7 * x + c[:, None, None, :] * r[:, None, None, None]) + 0.1 * x


def _np_guided(x, r, cond, uncond, scale, rho):
    both = _np_model(np.concatenate([x, x]), np.concatenate([r, r]), np.concatenate([cond, uncond]))
    pred, pred_uncond = both[: len(x)], both[len(x):]
    guided = pred_uncond + scale * (pred - pred_uncond)
    if rho <= 0:
        return guided
    return rho * guided * pred.std(ddof=1) / (guided.std(ddof=1) + 1e-9) + (1 - rho) * guided


def _np_sample(x, cond, uncond, noise, *, steps, cfg, cfg_rho=0.7, shift=1.0, sampler="ddpm", eta=None,
               t_start=1.0, t_end=0.0, cfg_t_start=None, cfg_t_stop=None):
    """The official GDF.sample loop, written out in numpy (float64). Returns (x0s, xs)."""
    eta = {"ddpm": 1.0, "ddim": 0.0}.get(sampler) if eta is None else eta
    t = np.linspace(t_start, t_end, steps + 1)
    logsnr = _np_logsnr(t, shift)
    x, x0s, xs = x.astype(np.float64), [], []
    for i in range(steps):
        r = np.full(len(x), _np_noise_cond(logsnr[i]))
        guided = cfg is not None and (cfg_t_stop is None or t[i] >= cfg_t_stop) and (
            cfg_t_start is None or t[i] <= cfg_t_start)
        if guided:
            scale = cfg[0] * t[i] + cfg[1] * (1 - t[i]) if isinstance(cfg, tuple) else cfg
            pred = _np_guided(x, r, cond, uncond, scale, cfg_rho)
        else:
            pred = _np_model(x, r, cond)
        (a, b), (a_next, b_next) = _np_scalers(logsnr[i]), _np_scalers(logsnr[i + 1])
        x0 = (x - pred * b) / a
        if sampler == "lcm":
            x = a_next * x0 + b_next * noise[i]
        else:
            sigma = eta * (b_next / b) * np.sqrt(1 - a**2 / a_next**2) if eta > 0 else 0.0
            x = a_next * x0 + np.sqrt(b_next**2 - sigma**2) * pred + sigma * noise[i]
        x0s.append(x0)
        xs.append(x)
    return np.stack(x0s), np.stack(xs)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x_init = rng.standard_normal((B, H, W, C)).astype(np.float32)
    cond, uncond = rng.standard_normal((2, B, C)).astype(np.float32)
    noise = rng.standard_normal((8, B, H, W, C)).astype(np.float32)
    return x_init, cond, uncond, noise


CASES = [
    dict(sampler="ddpm", steps=5, cfg=3.0, shift=2.0),
    dict(sampler="ddim", steps=4, cfg=(5.0, 1.5), shift=1.0, eta=0.5),
    dict(sampler="lcm", steps=3, cfg=2.0, shift=1.5),
    dict(sampler="ddpm", steps=6, cfg=4.0, shift=2.0, cfg_t_stop=0.4, t_start=0.8),
    dict(sampler="ddpm", steps=6, cfg=4.0, cfg_t_start=0.7, cfg_rho=0.0),
    dict(sampler="ddim", steps=3, cfg=None),
]


def _run(inputs, case, **extra):
    x_init, cond, uncond, noise = inputs
    uncond_inputs = {"c": jnp.asarray(uncond)} if case.get("cfg") is not None else None
    fn = functools.partial(sample, _jax_model, return_trajectory=True, **case, **extra)
    return jax.jit(fn)({"c": jnp.asarray(cond)}, uncond_inputs, x_init=jnp.asarray(x_init),
                       noise=jnp.asarray(noise[: case["steps"]]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loop_matches_official_algorithm(inputs, case):
    x_init, cond, uncond, noise = inputs
    ours = _run(inputs, case)
    ref_x0s, ref_xs = _np_sample(x_init, cond, uncond, noise, **case)
    # float32 vs float64; the first step divides by a = 0.01 (t=1), which amplifies rounding.
    assert relative_error(ours.x0s, ref_x0s) < 1e-5
    assert relative_error(ours.xs, ref_xs) < 1e-5
    np.testing.assert_array_equal(ours.x0, ours.x0s[-1])  # the stage result is the last x0
    np.testing.assert_array_equal(ours.x, ours.xs[-1])


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["ddpm", "cfg-window-t_start"])
def test_jitted_loop_equals_python_loop(inputs, case):
    x_init, cond, uncond, noise = inputs
    jitted = _run(inputs, case)
    steps = list(sample_steps(_jax_model, {"c": jnp.asarray(cond)}, {"c": jnp.asarray(uncond)},
                              x_init=jnp.asarray(x_init), noise=jnp.asarray(noise[: case["steps"]]),
                              settings=SamplerSettings(**case)))
    assert len(steps) == case["steps"]
    # Same plan, same step function: only XLA's fusion of the step math may differ.
    assert relative_error(jitted.x0s, np.stack([s.x0 for s in steps])) < 1e-6
    assert relative_error(jitted.xs, np.stack([s.x for s in steps])) < 1e-6


def test_t_start_below_one_keeps_the_step_count_over_a_shorter_range(inputs):
    """img2img: t_start=0.6 runs ``steps`` steps from 0.6 to 0, the network never sees r near 1."""
    x_init, cond, _, noise = inputs
    seen = []

    def recording_model(x, r, c):
        seen.append((x.shape[0], np.asarray(r)))
        return _jax_model(x, r, c)

    settings = SamplerSettings(steps=3, cfg=2.0, shift=2.0, t_start=0.6, cfg_t_stop=0.3)
    list(sample_steps(recording_model, {"c": jnp.asarray(cond)}, x_init=x_init, noise=noise[:3], settings=settings))
    t = np.linspace(0.6, 0.0, 4)
    expected_r = _np_noise_cond(_np_logsnr(t, 2.0))[:3]
    assert [n for n, _ in seen] == [2 * B, 2 * B, B]  # guided while t >= 0.3: t = 0.6, 0.4; then 0.2
    np.testing.assert_allclose([r[0] for _, r in seen], expected_r, rtol=1e-6)
    assert all(np.all(r == r[0]) for _, r in seen)
    plan = sampling_plan(3, t_start=0.6, shift=2.0)
    np.testing.assert_allclose(plan.t, t, atol=1e-7)
    np.testing.assert_array_equal(plan.r, np.concatenate([r[: B] for _, r in seen])[::B])


def test_network_r_at_t_one_is_the_official_constant():
    """torch's float32 r at t=1 (diffusers feeds 1.0), also when the plan is made inside a jit:
    one ulp of r there moves the trajectory by ~1e-4 (see sample_loop._on_host)."""
    for shift in (1.0, 2.0):
        assert sampling_plan(20, shift=shift).r[0] == np.float32(0.9935832)
    inside_jit = jax.jit(lambda: jnp.asarray(sampling_plan(6, shift=2.0).r))()
    np.testing.assert_array_equal(inside_jit, sampling_plan(6, shift=2.0).r)


def test_noise_from_key_is_deterministic_and_required(inputs):
    x_init, cond, _, _ = inputs
    run = jax.jit(lambda key: sample(_jax_model, {"c": jnp.asarray(cond)}, shape=(B, H, W, C), key=key, steps=3))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a.x0, b.x0)
    assert float(jnp.max(jnp.abs(a.x0 - c.x0))) > 1e-3
    with pytest.raises(ValueError, match="key or noise"):
        sample(_jax_model, {"c": cond}, x_init=x_init, steps=2)
    with pytest.raises(ValueError, match="x_init, or shape and key"):
        sample(_jax_model, {"c": cond}, steps=2)
    with pytest.raises(ValueError, match="steps, \\*x.shape"):
        sample(_jax_model, {"c": cond}, x_init=x_init, noise=np.zeros((3, B, H, W, C)), steps=2)
    # DDIM with eta=0 draws nothing: no key needed.
    assert sample(_jax_model, {"c": cond}, x_init=x_init, steps=2, sampler="ddim").x0.shape == x_init.shape


class _TinyDenoiser(nnx.Module):
    """A small NNX network with the (x, r, **conditions) call of Stage B/C."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(C, C, (3, 3), rngs=rngs)
        self.cond = nnx.Linear(C, C, rngs=rngs)

    def __call__(self, x, r, c):
        return self.conv(x) * (1 - r)[:, None, None, None] + self.cond(c)[:, None, None, :]


def test_nnx_model_under_nnx_jit_and_split_state(inputs):
    x_init, cond, uncond, noise = inputs
    model = _TinyDenoiser(nnx.Rngs(0))
    kwargs = dict(steps=4, cfg=3.0, shift=2.0)
    args = ({"c": jnp.asarray(cond)}, {"c": jnp.asarray(uncond)})

    @nnx.jit
    def with_module(model, cond, uncond, x_init, noise):
        return sample(lambda x, r, **c: model(x, r, **c), cond, uncond, x_init=x_init, noise=noise, **kwargs).x0

    graphdef, state = nnx.split(model)

    @jax.jit
    def with_state(state, cond, uncond, x_init, noise):
        net = nnx.merge(graphdef, state)
        return sample(lambda x, r, **c: net(x, r, **c), cond, uncond, x_init=x_init, noise=noise, **kwargs).x0

    eager = sample(lambda x, r, **c: model(x, r, **c), *args, x_init=x_init, noise=noise[:4], **kwargs).x0
    a = with_module(model, *args, x_init, noise[:4])
    b = with_state(state, *args, x_init, noise[:4])
    assert relative_error(a, eager) < 1e-6 and relative_error(b, eager) < 1e-6
    assert bool(jnp.all(jnp.isfinite(a)))
