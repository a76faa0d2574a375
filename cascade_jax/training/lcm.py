"""Latent consistency distillation of Stage C (LCM, Luo et al. 2023), ``stage: c_lcm``: a task of the one trainer.

The Stage C task's data and conditioning (with its official 5% caption dropout, so the student keeps working
with and without guidance), and three networks:

* the **teacher**: the Stage C being distilled, frozen (no gradient, no optimizer state; it stays bit-identical),
  which takes one skipping-step DDIM step from t to t' = t - skip/N on the GDF cosine schedule with
  classifier-free guidance inside the step (cond and "" batched together; ``lcm.guidance`` fixed or drawn
  per sample from a range);
* the **student**, ``generator``: with ``lcm.student: full`` a trainable copy of the teacher (the teacher is
  then a second, frozen copy, ``teacher``); with ``lcm.student: lora`` a LoRA on the teacher's own weights
  through the LoRA machinery (the teacher is the same network with the LoRA switched off), written as an
  ordinary LoRA file (``lora/lora.safetensors``) that ``--lora`` loads and stacks with other LoRAs;
* the **target**: the EMA of the student (the trainer's EMA, ``ema_*`` keys; the paper's mu = 0.95), or,
  without an EMA, the student itself without gradient, as the LCM-LoRA reference does.

The loss is the distance (pseudo-Huber or L2, ``lcm.loss``) between the student's consistency function at
(x_t, t) and the target's at the teacher's (x_t', t'); the boundary parameterisation and the solver are in
``cascade_jax.diffusion.consistency``. ``train/train_c_lcm.py`` writes the LCM-LoRA file at every save and at the
end, or exports the full student as a weights folder. The result samples with the LCM sampler in 1-8 steps
(``--prior-sampler lcm --prior-steps 4``, or a weights folder's sampling.json).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.diffusion import GDF, apply_cfg
from cascade_jax.diffusion.consistency import consistency_function, consistency_loss, draw_solver_times, \
    teacher_ddim_step
from cascade_jax.diffusion.scalers import per_sample, vp_scalers
from cascade_jax.models.lora import DEFAULT_FILTERS, LoRAParam, init_lora, set_enabled, shallow_copy
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.lcm_config import lcm_config
from cascade_jax.training.lora import NAME, LoRAFiles, LoRAOutput
from cascade_jax.training.stage_c import StageCTask, encode_text
from cascade_jax.training.task import LossAux, TrainModules, generator_filter, param_dtype, register_task


class ConsistencyDistillation(LoRAOutput):
    """The LCM machinery over a stage's task (mixed in before it: ``class X(ConsistencyDistillation, StageXTask)``).
    A stage supplies ``distillation_inputs`` (x0, conditions, the pipeline's unconditional conditions) and
    ``model_prediction`` (its network's float32 ε); everything else (teacher, student, target, solver, loss,
    LoRA file) is here, once, for ``c_lcm`` and ``b_lcm``."""

    adaptive_loss_weight = False  # the consistency loss has no per-level weighting in the paper
    uses_ema_target = True  # training/step.py passes the EMA (target network) to the loss

    def _check(self, cfg: TrainConfig):
        self.lcm = lcm_config(cfg.lcm)
        if cfg.cached_conditions:
            raise ValueError(f"stage {cfg.stage}: cached_conditions is not supported (the teacher's guidance needs "
                             "the text encoding of \"\" beside each caption's); set cached_conditions: false")
        if cfg.dropout:
            raise ValueError(f"stage {cfg.stage}: set dropout: false; the teacher's solver step and the target must "
                             "be deterministic functions (the paper distils without dropout)")
        if cfg.lora.train_tokens:
            raise ValueError(f"stage {cfg.stage}: train_tokens does not apply (distillation learns no new words); "
                             "remove it")

    def build(self, cfg: TrainConfig) -> TrainModules:
        self._check(cfg)
        modules = super().build(cfg)  # the stage task's modules
        if self.lcm.student == "lora":
            return self._with_lora(cfg, modules)
        teacher = self.build_generator(cfg, Path(cfg.output_path))  # the same weights, loaded once more
        teacher.eval()
        return TrainModules(teacher=teacher, **{name: getattr(modules, name) for name in modules.names})

    def _with_lora(self, cfg: TrainConfig, modules: TrainModules) -> TrainModules:
        """A LoRA on the loaded generator, without token rows (nothing here learns words)."""
        self.filters = tuple(cfg.lora.module_filters) if cfg.lora.module_filters is not None else DEFAULT_FILTERS
        self.train_tokens = []
        if cfg.lora.lora_checkpoint_path is not None:
            from cascade_jax.weights.lora_files import load_lora
            from cascade_jax.weights.lora_weights import attach_lora

            attach_lora(modules.generator, NAME, load_lora(cfg.lora.lora_checkpoint_path, modules.generator))
        else:
            init_lora(modules.generator, NAME, filters=self.filters, rank=cfg.lora.rank, key=jax.random.key(cfg.seed))
        self._record_layout(modules)
        return modules

    def adapt_abstract(self, modules: TrainModules, cfg: TrainConfig) -> TrainModules:
        self._check(cfg)
        if self.lcm.student == "lora":
            filters = tuple(cfg.lora.module_filters) if cfg.lora.module_filters is not None else DEFAULT_FILTERS
            init_lora(modules.generator, NAME, filters=filters, rank=cfg.lora.rank)
            return modules
        teacher = shallow_copy(modules.generator)  # its own variables (shapes only): frozen, not the student's
        return TrainModules(teacher=teacher, **{n: getattr(modules, n) for n in modules.names})

    def exports(self, cfg: TrainConfig) -> bool:
        return lcm_config(cfg.lcm).student != "lora"  # a full student (and its EMA) as weights folders

    def output_hooks(self, cfg: TrainConfig) -> list:
        if lcm_config(cfg.lcm).student != "lora":
            return []
        return [LoRAFiles(self, cfg, params_of=task_params, label="LCM-LoRA")]

    def trainable(self, cfg: TrainConfig):
        if lcm_config(cfg.lcm).student == "lora":
            return nnx.OfType(LoRAParam)  # the LoRA factors only
        return generator_filter(cfg.train_filter)  # the student; "teacher" is another attribute: frozen

    def host_batch(self, cfg: TrainConfig, batch: dict, rng: np.random.Generator) -> dict:
        arrays = super().host_batch(cfg, batch, rng)
        empty = self.tokenizer([""] * len(arrays["input_ids"]))  # the pipeline's unconditional text
        return {**arrays, "uncond_input_ids": empty["input_ids"], "uncond_attention_mask": empty["attention_mask"]}

    def plan_batch(self, cfg: TrainConfig) -> dict:
        """The stage's planned batch plus the "" token arrays ``host_batch`` adds (planning, ``--plan``)."""
        self._check(cfg)
        specs = super().plan_batch(cfg)
        return {**specs, "uncond_input_ids": specs["input_ids"], "uncond_attention_mask": specs["attention_mask"]}

    def uncond_text(self, modules, batch):
        """The encoding of "" (sequence, pooled): the pipelines' unconditional text, without gradient."""
        return jax.lax.stop_gradient(
            encode_text(modules.text_encoder, batch["uncond_input_ids"], batch["uncond_attention_mask"]))

    def loss(self, modules, batch, key, loss_state, cfg: TrainConfig, target=None):
        lcm, gdf = self.lcm, GDF()
        x0, cond, uncond = self.distillation_inputs(modules, batch)
        key_t, key_eps, key_w = jax.random.split(key, 3)
        t, t_prev = draw_solver_times(key_t, x0.shape[0], lcm.solver_steps, lcm.skip)
        logsnr, logsnr_prev = gdf.logsnr(t, lcm.shift), gdf.logsnr(t_prev, lcm.shift)
        a, b = (per_sample(v, x0.ndim) for v in vp_scalers(logsnr))
        # White noise, as the samplers draw and the LCM sampler re-noises with (Stage B trains on pyramid noise).
        noised = a * x0 + b * jax.random.normal(key_eps, x0.shape, jnp.float32)
        scalings = dict(sigma_data=lcm.sigma_data, timestep_scaling=lcm.timestep_scaling)

        x0_student = self.predict(modules.generator, gdf, noised, logsnr, cond)[0]
        f_student = consistency_function(noised, x0_student, t, **scalings)

        scale = self.guidance_scales(key_w, x0.shape[0])
        x_prev = jax.lax.stop_gradient(self.teacher_step(modules, gdf, noised, logsnr, logsnr_prev, cond, uncond,
                                                         scale))
        target_model = (target if target is not None else modules).generator
        x0_target = self.predict(target_model, gdf, x_prev, logsnr_prev, cond)[0]
        f_target = jax.lax.stop_gradient(consistency_function(x_prev, x0_target, t_prev, **scalings))
        per_sample_loss = consistency_loss(f_student, f_target, lcm.loss, lcm.huber_c)
        return jnp.mean(per_sample_loss), LossAux(per_sample_loss)

    def predict(self, model, gdf: GDF, x, logsnr, cond):
        """(predicted x0, predicted ε) of ``model`` at ``x`` with log-SNR ``logsnr``."""
        return gdf.undiffuse(x, logsnr, self.model_prediction(model, x, gdf.noise_cond(logsnr), cond))

    def guidance_scales(self, key, batch: int):
        """(B,) teacher guidance scales: the configured one, or uniform over [low, high] per sample."""
        low, high = self.lcm.guidance[0], self.lcm.guidance[-1]
        if low == high:
            return jnp.full((batch,), low, jnp.float32)
        return jax.random.uniform(key, (batch,), jnp.float32, low, high)

    def teacher_step(self, modules, gdf: GDF, x, logsnr, logsnr_prev, cond, uncond, scale):
        """x_t' from x_t: the teacher's guided prediction (cond and uncond as one batch) and one DDIM step."""
        both = lambda c, u: jnp.concatenate([c, u.astype(c.dtype)], axis=0)
        conditions = tuple(both(c, u) for c, u in zip(cond, uncond))
        if self.lcm.student == "lora":
            # The base weights alone: the student's network with its LoRA off, on a copy made in this trace
            # (the student keeps its LoRA; no state outside this function changes).
            teacher = shallow_copy(modules.generator)
            set_enabled(teacher, NAME, False)
        else:
            teacher = modules.teacher
        pred = self.model_prediction(teacher, both(x, x), gdf.noise_cond(both(logsnr, logsnr)), conditions)
        pred_cond, pred_uncond = jnp.split(pred, 2, axis=0)
        guided = apply_cfg(pred_cond, pred_uncond, per_sample(scale, x.ndim), self.lcm.cfg_rho, std_per_sample=True)
        x0, epsilon = gdf.undiffuse(x, logsnr, guided)
        return teacher_ddim_step(x, x0, epsilon, logsnr, logsnr_prev)


class LCMTask(ConsistencyDistillation, StageCTask):
    """``stage: c_lcm``: Stage C's data and conditioning; the unconditional side is "" and no image embedding."""

    def distillation_inputs(self, modules, batch):
        x0, clip_text, pooled, clip_img = self.conditions(modules, batch)
        uncond_text, uncond_pooled = self.uncond_text(modules, batch)
        return x0, (clip_text, pooled, clip_img), (uncond_text, uncond_pooled, jnp.zeros_like(clip_img))

    def model_prediction(self, model, x, noise_cond, cond):
        return model_prediction(model, x, noise_cond, cond)


def model_prediction(model, x, noise_cond, cond):
    """Stage C's float32 ε prediction of ``x`` at noise conditions ``noise_cond`` (B,)."""
    dtype = param_dtype(model)
    clip_text, pooled, clip_img = cond
    return model(x.astype(dtype), noise_cond, clip_text.astype(dtype), pooled.astype(dtype),
                 clip_img.astype(dtype)).astype(jnp.float32)


register_task("c_lcm", LCMTask)


def task_params(state):
    """The LoRA to write: the EMA (the target network, what the paper keeps) when there is one."""
    return state.ema if state.ema is not None else state.params
