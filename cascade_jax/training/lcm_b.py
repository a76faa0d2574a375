"""Latent consistency distillation of Stage B, ``stage: b_lcm``: the ``c_lcm`` machinery
(``training/lcm.py``: frozen teacher with guidance inside its DDIM solver step, full or LoRA student, EMA target,
consistency loss) over the Stage B task (``training/stage_b.py``).

x0 = Stage A latents, conditions = the EfficientNet latents (zeroed for 10%) and the pooled text (5% of captions
-> ""), as Stage B trains, so the student keeps working with and without guidance. The teacher's unconditional
side is what the pipeline's Stage B guidance uses: zero EfficientNet latents and the pooled encoding of "".
``train/train_b_lcm.py`` runs it; the LoRA file it writes (``model: stage_b``) is merged into Stage B by a weight
set's ``decoder_loras`` (``--weights demo-lcm``), and the result samples with ``--decoder-sampler lcm``.
"""

from __future__ import annotations

import jax.numpy as jnp

from cascade_jax.training.lcm import ConsistencyDistillation
from cascade_jax.training.stage_b import StageBTask
from cascade_jax.training.task import param_dtype, register_task


class StageBLCMTask(ConsistencyDistillation, StageBTask):
    def distillation_inputs(self, modules, batch):
        x0, effnet, pooled = self.conditions(modules, batch)
        _, uncond_pooled = self.uncond_text(modules, batch)
        return x0, (effnet, pooled), (jnp.zeros_like(effnet), uncond_pooled)

    def model_prediction(self, model, x, noise_cond, cond):
        """Stage B's float32 ε prediction (no dropout: the task refuses it)."""
        dtype = param_dtype(model)
        effnet, pooled = cond
        return model(x.astype(dtype), noise_cond, effnet.astype(dtype), pooled.astype(dtype)).astype(jnp.float32)


register_task("b_lcm", StageBLCMTask)
