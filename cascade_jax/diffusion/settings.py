"""A stage's sampling settings (one frozen type, validated when built), its plan, and the official defaults.

``SamplerSettings`` is the only settings type: the pipeline, the stage runner and the sampling
loop all take it as it is. ``STAGE_C_DEFAULTS`` / ``STAGE_B_DEFAULTS`` are the only place the
official per-stage values are written (Stage C 20 steps, cfg 4, shift 2; Stage B 10 steps,
cfg 1.1, shift 1; from the official text-to-image notebook); change one field with
``STAGE_C_DEFAULTS.replace(steps=30)``.

Every field is checked by name when the settings are made, so a setting that cannot work
(shift ≤ 0, a NaN guidance scale, ``steps=2.5`` or ``steps=True``) fails before any model
runs instead of surfacing as NaN latents.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import numpy as np

from cascade_jax.diffusion.gdf import GDF
from cascade_jax.diffusion.guidance import GuidanceScale, cfg_active, cfg_scales
from cascade_jax.diffusion.samplers import get_sampler
from cascade_jax.diffusion.schedule import torch_linspace


class SamplingPlan(NamedTuple):
    """Host-side, static description of the steps (numpy float32; constants of the jitted loop)."""

    t: np.ndarray  # (steps + 1,) sampler times, t[0] = t_start, t[-1] = t_end
    logsnr: np.ndarray  # (steps + 1,) shifted, clamped log-SNR at each t
    r: np.ndarray  # (steps,) noise condition fed to the network at each step
    cfg_scale: np.ndarray  # (steps,) guidance scale of each step
    cfg_on: np.ndarray  # (steps,) bool: whether step i runs guidance


def _on_host(fn, *args) -> np.ndarray:
    """Evaluate ``fn`` now, op by op, on the CPU, even while a jit is tracing.

    The network's sinusoidal embedding multiplies r by 10⁴, and the first step divides the
    prediction by a = 0.01 (x0 = (x − b·ε)/a), so the sampled trajectory is sensitive to the
    last bits of r: left inside the jitted loop, XLA constant-folded r at t=1 two ulp away from
    torch's, which moved the official fixture's trajectory by 1.5e-4 relative (2e-6 here).
    Computed here it is one set of numbers in every jit context and on every backend, and the
    CPU's op-by-op float32 results match torch's at t=1 (r = 0.9935832).
    """
    with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(fn(*args))


def sampling_plan(steps: int, t_start: float = 1.0, t_end: float = 0.0, shift: float = 1.0, cfg=None,
                  cfg_t_start: float | None = None, cfg_t_stop: float | None = None,
                  gdf: GDF = GDF()) -> SamplingPlan:
    _check_steps(steps)
    t = torch_linspace(t_start, t_end, int(steps) + 1)
    logsnr = _on_host(gdf.logsnr, t, shift)
    r = _on_host(gdf.noise_cond, logsnr[:-1])
    if cfg is None:
        return SamplingPlan(t, logsnr, r, np.zeros(steps, np.float32), np.zeros(steps, bool))
    return SamplingPlan(t, logsnr, r, cfg_scales(cfg, t[:-1]), cfg_active(t[:-1], cfg_t_start, cfg_t_stop))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_steps(steps):
    if not isinstance(steps, numbers.Integral) or isinstance(steps, (bool, np.bool_)) or steps < 1:
        raise ValueError(f"steps must be a positive integer (at least 1), got {steps!r}")


def _check_real(name: str, value, low: float, high: float, *, low_open=False, optional=False):
    if value is None and optional:
        return
    ok = _is_real(value) and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {high}], got {value!r}")


def _check_cfg(cfg):
    if cfg is None or callable(cfg):
        return
    values = cfg if isinstance(cfg, tuple) else (cfg,)
    if len(values) not in (1, 2) or not all(_is_real(v) and math.isfinite(v) for v in values):
        raise ValueError(f"cfg must be None (no guidance), a finite number, a finite (scale at t=1, scale at t=0) "
                         f"pair or a function of t, got {cfg!r}")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The static (host-side, hashable) settings of a stage's sampling loop.

    The field defaults are the official ``GDF.sample`` ones; a stage's official values are
    ``STAGE_C_DEFAULTS`` / ``STAGE_B_DEFAULTS``. ``cfg_std_per_sample=False`` is the official
    batch-wide CFG-rescale statistic (see ``guidance.apply_cfg``).
    """

    steps: int = 20
    cfg: GuidanceScale | None = 3.0  # None: no guidance (and no unconditional pass)
    cfg_rho: float = 0.7
    cfg_t_start: float | None = None
    cfg_t_stop: float | None = None
    cfg_std_per_sample: bool = False
    shift: float = 1.0
    sampler: str = "ddpm"  # ddpm | ddim | lcm
    eta: float | None = None  # None: the sampler's default (ddpm 1, ddim 0)
    t_start: float = 1.0
    t_end: float = 0.0
    gdf: GDF = GDF()

    def __post_init__(self):
        if isinstance(self.cfg, list):
            object.__setattr__(self, "cfg", tuple(self.cfg))  # keep the settings hashable
        _check_steps(self.steps)
        _check_cfg(self.cfg)
        _check_real("cfg_rho", self.cfg_rho, 0.0, 1.0)
        _check_real("cfg_t_start", self.cfg_t_start, 0.0, 1.0, optional=True)
        _check_real("cfg_t_stop", self.cfg_t_stop, 0.0, 1.0, optional=True)
        if not isinstance(self.cfg_std_per_sample, (bool, np.bool_)):
            raise ValueError(f"cfg_std_per_sample must be True or False, got {self.cfg_std_per_sample!r}")
        _check_real("shift", self.shift, 0.0, math.inf, low_open=True)
        _check_real("eta", self.eta, 0.0, math.inf, optional=True)
        _check_real("t_start", self.t_start, 0.0, 1.0, low_open=True)
        _check_real("t_end", self.t_end, 0.0, 1.0)
        if self.t_end >= self.t_start:
            raise ValueError(f"t_end ({self.t_end}) must be below t_start ({self.t_start})")
        if not isinstance(self.sampler, str):
            raise ValueError(f"sampler must be a name (ddpm, ddim or lcm), got {self.sampler!r}")
        get_sampler(self.sampler, self.eta)  # fail early on a bad sampler/eta pair

    def replace(self, **changes) -> "SamplerSettings":
        """A copy with ``changes`` (validated like a new one)."""
        return dataclasses.replace(self, **changes)

    def plan(self) -> SamplingPlan:
        """The steps of these settings (computed once per settings: a pipeline asks for them on every call)."""
        return _cached_plan(self)


@functools.lru_cache(maxsize=256)
def _cached_plan(settings: SamplerSettings) -> SamplingPlan:
    plan = sampling_plan(settings.steps, settings.t_start, settings.t_end, settings.shift, settings.cfg,
                         settings.cfg_t_start, settings.cfg_t_stop, settings.gdf)
    for array in plan:
        array.setflags(write=False)  # shared by every caller of these settings
    return plan


# Official inference settings per stage (the official text-to-image notebook). The only copy.
STAGE_C_DEFAULTS = SamplerSettings(steps=20, cfg=4.0, shift=2.0)
STAGE_B_DEFAULTS = SamplerSettings(steps=10, cfg=1.1, shift=1.0)
