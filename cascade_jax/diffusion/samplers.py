"""One reverse step from log-SNR ``logsnr`` to the less noisy ``logsnr_next``
(official ``gdf.DDIMSampler``, ``DDPMSampler``, ``LCMSampler``).

Every step takes the current x, the predicted x0 and ε, and this step's standard-normal
``noise`` (same shape as x) explicitly, so a test can inject the very noise a PyTorch
run drew. The official samplers draw it on every step, the last one included; the
sampling loop (``sample_loop.py``) documents how that differs from diffusers.
"""

from __future__ import annotations

import jax.numpy as jnp

from cascade_jax.diffusion.scalers import per_sample, vp_scalers


def ddim_step(x, x0, epsilon, logsnr, logsnr_next, noise=None, *, eta: float = 0.0):
    """DDIM with stochasticity ``eta`` (0: deterministic, 1: DDPM's posterior variance).

    x' = a'·x0 + sqrt(b'² − σ²)·ε + σ·noise, σ = eta·(b'/b)·sqrt(1 − a²/a'²).
    """
    a, b = (per_sample(v, x0.ndim) for v in vp_scalers(logsnr))
    a_next, b_next = (per_sample(v, x0.ndim) for v in vp_scalers(logsnr_next))
    if eta > 0:
        if noise is None:
            raise ValueError(f"ddim_step with eta={eta} needs this step's noise")
        sigma = eta * jnp.sqrt(b_next**2 / b**2) * jnp.sqrt(1 - a**2 / a_next**2)
    else:
        sigma, noise = 0.0, 0.0  # the official code multiplies its noise by 0 here
    # Clamp at 0: rounding can make b'² − σ² a hair negative when the two are equal.
    return a_next * x0 + jnp.sqrt(jnp.maximum(b_next**2 - sigma**2, 0.0)) * epsilon + sigma * noise


def ddpm_step(x, x0, epsilon, logsnr, logsnr_next, noise=None, *, eta: float = 1.0):
    """DDPM: DDIM with eta = 1 (the official default sampler)."""
    return ddim_step(x, x0, epsilon, logsnr, logsnr_next, noise, eta=eta)


def lcm_step(x, x0, epsilon, logsnr, logsnr_next, noise=None, *, eta=None):
    """LCM: re-noise the predicted x0 with fresh noise to the next level, x' = a'·x0 + b'·noise."""
    if eta is not None:
        raise ValueError("the LCM sampler has no eta")
    if noise is None:
        raise ValueError("lcm_step needs this step's noise")
    a_next, b_next = (per_sample(v, x0.ndim) for v in vp_scalers(logsnr_next))
    return x0 * a_next + noise * b_next


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step, "lcm": lcm_step}
DEFAULT_ETA = {"ddpm": 1.0, "ddim": 0.0, "lcm": None}


def get_sampler(name: str, eta=None):
    """(step function, eta to call it with, whether it consumes noise) for a sampler name."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if name == "lcm" and eta is not None:
        raise ValueError("the LCM sampler has no eta; leave eta=None")
    eta = DEFAULT_ETA[name] if eta is None else float(eta)
    needs_noise = name == "lcm" or eta > 0
    return SAMPLERS[name], eta, needs_noise
