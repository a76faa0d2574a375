"""Training: one trainer for Stages C, B, A, the Previewer and the variants built on them (LoRA, ControlNet).

Extension point — a *task* (:class:`cascade_jax.training.task.Task`) says which models a
loss needs (``build``), which of their parameters train (``trainable``: an NNX filter, so frozen
parts get no gradient, no optimizer state and no EMA), how a loader batch becomes arrays on the
host (``host_batch``) and the loss of one micro-batch (``loss``, traced inside the jitted step).
Stage C (``stage_c.StageCTask``, ``stage: c``), Stage B (``stage_b.StageBTask``, ``stage: b``),
Stage A (``stage_a.StageATask``, ``stage: a``, a VQ autoencoder) and the Previewer
(``previewer.PreviewerTask``, ``stage: previewer``) are tasks; a LoRA or ControlNet trainer
subclasses one, adds its module in ``build``, narrows ``trainable`` to it and calls
``register_task("c_lora", ...)``. Everything else — config, AdamW with warm-up and clipping,
accumulation, EMA, adaptive loss buckets, sharding, checkpoints and resume, logging, export — is
shared. Checkpoints, logging, sample collages and exports are hooks (``training/hooks.py``); add your own with
``TrainerHooks.add_hook(fn, every=N)``.

    from cascade_jax.training import load_config, train, export_run
    run = train(load_config("finetune_c_3b", ["batch_size=64", "mesh.fsdp=8"]))
    export_run(run, "out/")
"""

from cascade_jax.training import previewer, stage_a, stage_b, stage_c  # noqa: F401  (register the tasks)
from cascade_jax.training.config import MeshConfig, TrainConfig, config_from_dict, load_config
from cascade_jax.training.hooks import Hook, StepInfo, TrainerHooks
from cascade_jax.training.loop import Run, build_run, export_run, train
from cascade_jax.training.state import TrainState
from cascade_jax.training.task import LossAux, Task, TrainModules, generator_filter, get_task, register_task

__all__ = ["MeshConfig", "TrainConfig", "config_from_dict", "load_config", "Hook", "StepInfo", "TrainerHooks", "Run",
           "build_run", "export_run", "train",
           "TrainState", "LossAux", "Task", "TrainModules", "generator_filter", "get_task", "register_task"]
