"""The ``lcm:`` section of a ``stage: c_lcm`` / ``b_lcm`` config (latent consistency distillation, ``training/lcm.py``).

Defaults are the LCM paper's / reference implementation's values (Luo et al. 2023; diffusers'
``train_lcm_distill_*``), adapted to Stable Cascade where the paper's do not carry over (see each field).
"""

from __future__ import annotations

import dataclasses
import difflib

from cascade_jax.data.config_values import coerce_dataclass_fields
from cascade_jax.diffusion.consistency import LOSS_KINDS, SIGMA_DATA, TIMESTEP_SCALING

STUDENTS = ("full", "lora")


@dataclasses.dataclass(frozen=True)
class LCMConfig:
    # "full": the student is a trainable copy of the teacher; "lora": a LoRA on the frozen teacher (LCM-LoRA,
    # rank / module_filters from the top-level LoRA keys), written as an ordinary LoRA file that stacks with others.
    student: str = "full"
    solver_steps: int = 50  # N: the paper's 50 DDIM steps (skipping interval k = 20 of 1,000)
    skip: int = 1  # grid steps between t and t' (the reference's k in units of the N-step grid)
    # Classifier-free guidance scale of the teacher's solver step, the pipeline's convention
    # (uncond + scale·(cond - uncond)): one value, or [low, high] drawn uniformly per sample (the paper's
    # omega in [2, 14] is scale 1 + omega). Stage C has no guidance-scale input, so a range teaches the
    # student the average of the teacher's guided steps; one value matches one sampling setting exactly.
    guidance: tuple[float, ...] = (4.0,)  # the official Stage C sampling scale
    cfg_rho: float = 0.0  # the teacher's CFG rescale (the sampler's cfg_rho); 0 as in the paper
    shift: float = 1.0  # the schedule shift of the solver grid (official training: 1; Stage C samples with 2)
    loss: str = "huber"  # huber (the reference's pseudo-Huber) | l2 (the paper's first version)
    huber_c: float = 0.001  # the reference's huber_c
    sigma_data: float = SIGMA_DATA
    timestep_scaling: float = TIMESTEP_SCALING

    def __post_init__(self):
        coerce_dataclass_fields(self, "lcm.")
        checks = [(self.student in STUDENTS, f"lcm.student={self.student!r}: use one of {STUDENTS}"),
                  (self.loss in LOSS_KINDS, f"lcm.loss={self.loss!r}: use one of {LOSS_KINDS}"),
                  (self.solver_steps >= 1, f"lcm.solver_steps={self.solver_steps}: use 1 or more"),
                  (1 <= self.skip <= self.solver_steps,
                   f"lcm.skip={self.skip}: use 1..solver_steps ({self.solver_steps})"),
                  (len(self.guidance) in (1, 2) and all(g >= 0 for g in self.guidance)
                   and self.guidance[0] <= self.guidance[-1],
                   f"lcm.guidance={list(self.guidance)}: use one scale >= 0 or [low, high] with low <= high"),
                  (0 <= self.cfg_rho <= 1, f"lcm.cfg_rho={self.cfg_rho}: use a value in [0, 1]"),
                  (self.shift > 0, f"lcm.shift={self.shift}: use a positive shift"),
                  (self.huber_c > 0, f"lcm.huber_c={self.huber_c}: use a positive value")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def lcm_config(values: dict | None) -> LCMConfig:
    """The ``lcm:`` mapping as an LCMConfig; an unknown key is refused with the closest valid one."""
    values = dict(values or {})
    valid = [f.name for f in dataclasses.fields(LCMConfig)]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            raise ValueError(f"unknown lcm key {key!r}; " + (f"did you mean {close[0]!r}?" if close else
                                                              f"valid keys: {', '.join(valid)}"))
    if "guidance" in values and not isinstance(values["guidance"], (list, tuple)):
        values["guidance"] = [values["guidance"]]
    return LCMConfig(**values)
