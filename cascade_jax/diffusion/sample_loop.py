"""The sampling loop of one stage, as the official ``GDF.sample`` runs it, in one ``lax.scan``.

Official behaviour (the default here), step by step:

* the sampler times are ``torch.linspace(t_start, t_end, steps + 1)`` (float32, rounded as
  torch rounds); step i goes from t[i] to t[i+1], so ``t_start < 1`` keeps ``steps`` steps,
  each covering a smaller stretch (img2img passes an ``x_init`` noised to ``t_start``);
* each t becomes a log-SNR of the cosine schedule, lowered by 2·ln(shift) and clamped to the
  unshifted range; the network is fed ``r = CosineTNoiseCond(logSNR)`` of that *shifted*
  log-SNR (0.99358 at t=1, any shift), never t itself;
* with guidance, the network runs once on the batch [x, x] with conditions
  [cond, uncond] and r repeated; pred = lerp(uncond, cond, scale), rescaled towards the
  conditional prediction's global std by ``cfg_rho``; the scale may be a (t=1, t=0) pair
  or a function of t, and guidance only runs while cfg_t_stop ≤ t ≤ cfg_t_start;
* predicted x0 and ε come from the target (ε for Stable Cascade); the sampler step
  (DDPM by default) moves x to the next level and draws noise on *every* step, the last
  included; the stage's result is the last predicted x0, not the last x.

Differences to diffusers' ``StableCascadePriorPipeline`` / ``StableCascadeDecoderPipeline``
(0.42.1), which this module reproduces only when asked to:

* diffusers feeds r = t (1.0 at the first step, where the official code feeds 0.99358)
  and has no resolution ``shift`` (Stage C's official default is shift 2);
* no ``cfg_rho`` rescale (diffusers is ``cfg_rho=0``), and the decoder's default guidance
  is 0 (no guidance) where the official Stage B uses 1.1;
* its DDPM step adds no noise on the last step and it returns that last x, not the last
  predicted x0.

A fix over the official code: when guidance is off for a step (``cfg_t_start`` /
``cfg_t_stop``), the official loop calls the network on x with the *concatenated* 2B-batch
conditions; here it gets the conditional inputs only.

Usage with an NNX model (jit once; the loop runs on device without host round trips)::

    @nnx.jit
    def generate(model, cond, uncond, key):
        fn = lambda x, r, **c: model(x, r, **c)
        return sample_with_settings(fn, STAGE_C_DEFAULTS, cond, uncond, shape=(2, 24, 24, 16), key=key).x0
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.diffusion.gdf import GDF
from cascade_jax.diffusion.guidance import GuidanceScale, apply_cfg, concat_conditions
from cascade_jax.diffusion.samplers import get_sampler
from cascade_jax.diffusion.settings import SamplerSettings, SamplingPlan

# on_step(index, x, x0): a traced hook called inside the loop after each step (index is a traced
# int32 scalar); it returns nothing and may only have side effects such as jax.debug.callback.
StepHook = Callable[[jax.Array, jax.Array, jax.Array], None]


class SampleOutput(NamedTuple):
    x0: jnp.ndarray  # last predicted x0: the result of the stage
    x: jnp.ndarray  # x after the last step (still carries the last step's noise)
    x0s: jnp.ndarray | None = None  # (steps, ...) predicted x0 of every step, if asked for
    xs: jnp.ndarray | None = None  # (steps, ...) x after every step, if asked for


def _segments(cfg_on: np.ndarray):
    """(first, end, guided) runs of consecutive steps with the same guidance on/off."""
    runs, first = [], 0
    for i in range(1, len(cfg_on) + 1):
        if i == len(cfg_on) or cfg_on[i] != cfg_on[first]:
            runs.append((first, i, bool(cfg_on[first])))
            first = i
    return runs


def _predict(model_fn, x, r, scale, conditions, guided_conditions, guided: bool, settings):
    """Network prediction at noise condition ``r`` (a scalar), guided or not, in float32."""
    r = jnp.full((x.shape[0],), r, jnp.float32)
    if not guided:
        return jnp.asarray(model_fn(x, r, **conditions), jnp.float32)
    both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([r, r]), **guided_conditions)
    pred, pred_uncond = jnp.split(jnp.asarray(both, jnp.float32), 2)
    return apply_cfg(pred, pred_uncond, scale, settings.cfg_rho, std_per_sample=settings.cfg_std_per_sample)


def _step_builder(model_fn, conditions, guided_conditions, settings: SamplerSettings, key_steps,
                  trajectory: bool, on_step: StepHook | None = None) -> Callable[[bool], Callable]:
    """guided -> scan body ``(carry=(x, x0), per-step slice) -> (carry, outputs)``."""
    step_fn, eta, needs_noise = get_sampler(settings.sampler, settings.eta)

    def make(guided: bool):
        def step(carry, s):
            x = carry[0]
            pred = _predict(model_fn, x, s["r"], s["scale"], conditions, guided_conditions, guided, settings)
            x0, epsilon = settings.gdf.undiffuse(x, s["logsnr"], pred)
            noise = s.get("noise")
            if noise is None and needs_noise:
                # One independent draw per step, whatever segment the step falls in.
                noise = jax.random.normal(jax.random.fold_in(key_steps, s["index"]), x.shape, jnp.float32)
            x = step_fn(x, x0, epsilon, s["logsnr"], s["logsnr_next"], noise, eta=eta)
            if on_step is not None:
                on_step(s["index"], x, x0)
            return (x, x0), ((x, x0) if trajectory else None)

        return step

    return make


def _initial_x(settings: SamplerSettings, x_init, shape, key, noise):
    """(x at t_start in float32, per-step noise array or None, key for per-step noise or None)."""
    needs_noise = get_sampler(settings.sampler, settings.eta)[2]
    if x_init is None and (shape is None or key is None):
        raise ValueError("sample: pass x_init, or shape and key to draw it from")
    key_init, key_steps = jax.random.split(key) if key is not None else (None, None)
    x = jax.random.normal(key_init, tuple(shape), jnp.float32) if x_init is None else jnp.asarray(x_init, jnp.float32)
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != (settings.steps, *x.shape):
            raise ValueError(f"sample: noise has shape {noise.shape}; expected (steps, *x.shape) = "
                             f"{(settings.steps, *x.shape)}")
    elif needs_noise and key is None:
        raise ValueError(f"sample: the {settings.sampler!r} sampler draws noise every step; pass key or noise")
    return x, noise, key_steps


def _per_step_arrays(settings: SamplerSettings, plan: SamplingPlan, noise, cfg_scale=None) -> dict:
    """Scan inputs, leading axis = step: levels, network r, guidance scale (and noise)."""
    scale = jnp.asarray(plan.cfg_scale if cfg_scale is None else cfg_scale, jnp.float32)
    if scale.shape != (settings.steps,):
        raise ValueError(f"sample: cfg_scale has shape {scale.shape}; expected (steps,) = ({settings.steps},)")
    arrays = {"index": jnp.arange(settings.steps), "logsnr": jnp.asarray(plan.logsnr[:-1]),
              "logsnr_next": jnp.asarray(plan.logsnr[1:]), "r": jnp.asarray(plan.r), "scale": scale}
    if noise is not None:
        arrays["noise"] = noise
    return arrays


def _prepare(model_fn, conditions, uncond_conditions, x_init, shape, key, noise, settings, trajectory,
             on_step=None, cfg_scale=None):
    plan = settings.plan()
    x, noise, key_steps = _initial_x(settings, x_init, shape, key, noise)
    conditions = dict(conditions or {})
    guided = concat_conditions(conditions, uncond_conditions) if plan.cfg_on.any() else None
    make_step = _step_builder(model_fn, conditions, guided, settings, key_steps, trajectory, on_step)
    return x, _per_step_arrays(settings, plan, noise, cfg_scale), make_step, _segments(plan.cfg_on)


def sample_with_settings(model_fn: Callable, settings: SamplerSettings, conditions: dict,
                         uncond_conditions: dict | None = None, *, x_init=None, shape=None, key=None, noise=None,
                         return_trajectory: bool = False, on_step: StepHook | None = None,
                         cfg_scale=None) -> SampleOutput:
    """Run one stage's reverse diffusion with ``settings``; ``.x0`` of the result is the stage's output.

    ``model_fn(x, r, **conditions)`` maps x (B, ..., C) and r (B,) to the prediction; it is
    called inside ``lax.scan``, so wrap the whole call in ``jax.jit`` / ``nnx.jit`` (everything
    but the arrays is static). Start from ``x_init``, or from N(0, 1) of ``shape`` drawn from
    ``key``. Per-step noise is ``noise[i]`` when a (steps, *x.shape) array is given, else drawn
    from ``key``. ``on_step(index, x, x0)`` (see ``StepHook``) runs inside the loop after each step.
    ``cfg_scale``: the (steps,) guidance scales to use instead of ``settings.plan().cfg_scale``, e.g. as a
    traced argument, so that one compiled loop serves every scale (which steps are guided still comes
    from ``settings``).
    """
    x, per_step, make_step, segments = _prepare(model_fn, conditions, uncond_conditions, x_init, shape,
                                                key, noise, settings, return_trajectory, on_step, cfg_scale)
    carry, outputs = (x, jnp.zeros_like(x)), []
    # One scan per run of guided / unguided steps: the batch size differs between them.
    for first, end, guided in segments:
        part = jax.tree.map(lambda a: a[first:end], per_step)
        carry, out = jax.lax.scan(make_step(guided), carry, part)
        outputs.append(out)
    x, x0 = carry
    if not return_trajectory:
        return SampleOutput(x0, x)
    xs, x0s = (jnp.concatenate(parts) for parts in zip(*outputs))
    return SampleOutput(x0, x, x0s, xs)


def sample(model_fn: Callable, conditions: dict, uncond_conditions: dict | None = None, *, x_init=None,
           shape=None, key=None, noise=None, steps: int = 20, cfg: GuidanceScale | None = 3.0,
           cfg_rho: float = 0.7, cfg_t_start: float | None = None, cfg_t_stop: float | None = None,
           cfg_std_per_sample: bool = False, shift: float = 1.0, sampler: str = "ddpm",
           eta: float | None = None, t_start: float = 1.0, t_end: float = 0.0, gdf: GDF = GDF(),
           return_trajectory: bool = False) -> SampleOutput:
    """:func:`sample_with_settings` with the settings given as keywords (the official ``GDF.sample``
    defaults; ``STAGE_C_DEFAULTS`` / ``STAGE_B_DEFAULTS`` hold the per-stage ones)."""
    settings = SamplerSettings(steps, cfg, cfg_rho, cfg_t_start, cfg_t_stop, cfg_std_per_sample, shift,
                               sampler, eta, t_start, t_end, gdf)
    return sample_with_settings(model_fn, settings, conditions, uncond_conditions, x_init=x_init, shape=shape,
                                key=key, noise=noise, return_trajectory=return_trajectory)


def sample_steps(model_fn: Callable, conditions: dict, uncond_conditions: dict | None = None, *,
                 x_init=None, shape=None, key=None, noise=None,
                 settings: SamplerSettings = SamplerSettings()) -> Iterator[SampleOutput]:
    """The same loop step by step in Python, yielding ``SampleOutput(x0, x)`` after each step.

    For previews and debugging (the official ``GDF.sample`` is such a generator). Same plan,
    noise and step function as :func:`sample`, so the same numbers up to float32 rounding
    (XLA fuses the scanned step differently: ~1e-7 relative). Steps run op by op; pass a
    jitted ``model_fn`` for speed.
    """
    x, per_step, make_step, segments = _prepare(model_fn, conditions, uncond_conditions, x_init, shape,
                                                key, noise, settings, False)
    carry = (x, jnp.zeros_like(x))
    for first, end, guided in segments:
        step = make_step(guided)
        for i in range(first, end):
            carry, _ = step(carry, jax.tree.map(lambda a: a[i], per_step))
            yield SampleOutput(carry[1], carry[0])
