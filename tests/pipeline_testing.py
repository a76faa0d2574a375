"""Test stand-ins for the pipeline's per-stage runner (cascade_jax.pipelines.stage_runner.StageRunner).

``LoopRunner`` has the runner's call signature and draws the same noise from the same seeds, but
samples with ``cascade_jax.diffusion.sample_steps`` (the step-by-step twin of the scanned loop) and a
jitted network forward. With ``mode=DIFFUSERS`` it samples as diffusers' Stable Cascade pipelines do
(``LoopMode`` has one switch per difference), so ``StableCascadePipeline`` with LoopRunners swapped in for ``prior`` /
``decoder`` runs the pipeline's own prompt handling, conditioning and decoding around a diffusers-style
sampler. Every call is recorded (settings, conditions, initial and per-step noise) so the very same
noise can be injected into a PyTorch run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.diffusion import SamplerSettings, SamplingPlan, sample_steps
from cascade_jax.pipelines.stage_runner import _noise, image_keys


@dataclasses.dataclass(frozen=True)
class DiffusersSamplerSettings(SamplerSettings):
    """diffusers' schedule: the network is fed r = t itself (1.0 at the first step) instead of the
    noise condition of the (shifted) log-SNR; the levels (log-SNR) are the same cosine schedule."""

    def plan(self) -> SamplingPlan:
        if self.shift != 1:
            raise ValueError("diffusers has no resolution shift: use shift=1")
        plan = super().plan()
        return plan._replace(r=plan.t[:-1].copy())


def diffusers_settings(settings: SamplerSettings) -> DiffusersSamplerSettings:
    return DiffusersSamplerSettings(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)})


def _apply(graphdef, state, x, r, **conditions):
    return nnx.merge(graphdef, state)(x, r, **conditions)


_apply_jit = jax.jit(_apply, static_argnums=0)


@dataclasses.dataclass
class Call:
    settings: SamplerSettings
    conditions: dict
    uncond: dict | None
    x_init: np.ndarray  # (B, h, w, c) the starting x
    noise: np.ndarray  # (steps, B, h, w, c) the per-step noise as used (zero on diffusers' last step)
    result: np.ndarray


@dataclasses.dataclass(frozen=True)
class LoopMode:
    """How a LoopRunner samples: the official way (defaults) or diffusers' way, one switch per difference."""

    r_is_t: bool = False  # feed r = t (diffusers) instead of the noise condition of the log-SNR (official)
    last_step_noise: bool = True  # official DDPM adds noise on the last step too; diffusers does not
    return_x: bool = False  # diffusers returns the last x; the official sampler the last predicted x0


OFFICIAL = LoopMode()
DIFFUSERS = LoopMode(r_is_t=True, last_step_noise=False, return_x=True)


class LoopRunner:
    """``StageRunner``'s interface and noise; samples step by step as ``mode`` says."""

    def __init__(self, name: str, runner, mode: LoopMode = OFFICIAL):
        self.name, self.mode = name, mode
        self.graphdef, self.state = runner.graphdef, runner.state
        self.calls: list[Call] = []

    def model_fn(self, x, r, **conditions):
        return _apply_jit(self.graphdef, self.state, x, r, **conditions)

    def __call__(self, settings, x_shape, seeds, conditions, uncond, x_init=None, timing=None, *, stream=0,
                 callback=None, callback_x0=False):
        drawn, noise = _noise(image_keys(seeds, stream), tuple(x_shape), settings.steps)
        x_init = drawn if x_init is None else jnp.asarray(x_init, jnp.float32)
        noise = np.array(noise)
        if self.mode.r_is_t:
            settings = diffusers_settings(settings)
        if not self.mode.last_step_noise:
            noise[-1] = 0  # diffusers draws it but multiplies it by (t_next != 0) = 0
        out = None
        for out in sample_steps(self.model_fn, conditions, uncond, x_init=x_init, noise=noise, settings=settings):
            pass
        result = np.asarray(out.x if self.mode.return_x else out.x0)
        self.calls.append(Call(settings, conditions, uncond, np.asarray(x_init), noise, result))
        if timing is not None:
            timing.steps = settings.steps
        return jnp.asarray(result)


class RecordingRunner:
    """Wraps a real StageRunner and records the arguments of each call."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, settings, x_shape, seeds, conditions, uncond, x_init=None, timing=None, **kwargs):
        self.calls.append(dict(settings=settings, x_shape=x_shape, seeds=list(seeds), conditions=conditions,
                               uncond=uncond, x_init=x_init, **kwargs))
        out = self.runner(settings, x_shape, seeds, conditions, uncond, x_init, timing, **kwargs)
        self.calls[-1]["result"] = np.asarray(out)
        return out

    def __getattr__(self, name):
        return getattr(self.runner, name)
