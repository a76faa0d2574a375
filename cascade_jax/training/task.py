"""A training task: what is trained, how its models are built and the loss of one batch.

The trainer (``cascade_jax.training.loop``) is generic; a :class:`Task` supplies:

* ``build(cfg) -> TrainModules``: every model the loss needs, under fixed attribute names
  (``generator`` is the one that is trained/exported; frozen encoders beside it);
* ``trainable(cfg)``: an NNX filter over the paths of the ``TrainModules`` (a callable
  ``(path, variable) -> bool``, a Variable type such as a LoRA parameter type, ...). Only
  matching variables get gradients, optimizer moments and EMA; the rest is frozen, passed to
  the step as a constant argument and stored in the compute dtype;
* ``host_batch(cfg, batch, rng) -> dict of numpy arrays``: per-host preprocessing of a loader
  batch (tokenising, the random caption / image-embedding / EfficientNet choices drawn from
  ``rng``, which is seeded per step and host so that resuming repeats them exactly);
* ``loss(modules, batch, key, loss_state, cfg) -> (loss, LossAux)``: traced inside the jitted
  step on one micro-batch; ``key`` gives the noise levels, noise and dropout;
* ``export_model(cfg) -> (model name, config)``: how the trained generator is saved.
* ``exports(cfg)`` / ``output_hooks(cfg)``: what ``train/*.py`` write besides checkpoints: an export folder
  (by default), and hooks of the task's own products (the LoRA task's ``LoRAFiles``).

A task keeps no state a later call depends on: what a method needs it is given (the config; the run's
``stack_layouts`` for the LoRA writer), or it computes again from the config.

Stage C and Stage B are the two tasks in this package (``stage_c.py``, ``stage_b.py``). LoRA or
ControlNet training is a further task: subclass one of them, add the adapter/ControlNet module in
``build`` and make ``trainable`` select only its parameters (e.g. ``nnx.OfType(LoRAParam)`` or a
path filter on ``controlnet``); register it with :func:`register_task` under a ``stage`` name.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax import storage
from cascade_jax.diffusion import adaptive_loss_weight_init
from cascade_jax.models.clip import CLIPEncoder
from cascade_jax.models.random_init import random_model
from cascade_jax.models.unet import CascadeUNet
from cascade_jax.models.unet_stack import stack_units
from cascade_jax.models.registry import abstract_model, load_config
from cascade_jax.nn.params import official_key
from cascade_jax.training.config import TrainConfig

TASKS: dict[str, Callable[[], "Task"]] = {}


def register_task(stage: str, factory: Callable[[], "Task"]):
    TASKS[stage] = factory


def get_task(stage: str) -> "Task":
    """The task of ``stage``: a registered name, or a project's own Task class by its import path
    (``stage: package.module:ClassName``; imported here, when a run starts, by whichever process runs it)."""
    if stage not in TASKS and isinstance(stage, str) and stage.count(":") == 1:
        module_name, name = stage.split(":")
        try:
            TASKS[stage] = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"stage {stage!r} cannot be imported ({err}); name a Task class as "
                             "package.module:ClassName, or one of the registered tasks: "
                             f"{sorted(k for k in TASKS if ':' not in k)}") from None
    if stage not in TASKS:
        raise ValueError(f"unknown training stage {stage!r}; registered tasks: {sorted(TASKS)}, or a Task class "
                         "as package.module:ClassName")
    return TASKS[stage]()


class LossAux(NamedTuple):
    per_sample_loss: jax.Array  # (b,) unweighted MSE, what the adaptive buckets track (logged as "loss")
    logsnr: jax.Array | None = None  # (b,); None for a task without noise levels (Task.adaptive_loss_weight False)


class TrainModules(nnx.Module):
    """The models of a task as attributes (paths start with the attribute name)."""

    def __init__(self, **modules):
        self.names = tuple(modules)
        for name, module in modules.items():
            setattr(self, name, module)


def generator_filter(patterns=()):
    """Trainable = the generator's parameters whose official name matches one of ``patterns`` (all if empty)."""
    compiled = [re.compile(p) for p in patterns]

    def trainable(path, variable) -> bool:
        if not path or path[0] != "generator" or not isinstance(variable, nnx.Param):
            return False
        name = official_key(path[1:])
        return not compiled or any(c.search(name) for c in compiled)

    return trainable


class Task:
    """Base class of the training tasks; see the module docstring for the contract."""

    generator_model: str = ""  # registry name of the generator
    versions: dict = {}  # official model_version -> generator preset
    # attribute -> (registry model, preset, config key of its weights); the attribute is also the
    # component name in a pipeline set (``encoders: tiny``)
    frozen: dict = {}
    # Whether the loss has per-sample noise levels the adaptive loss weight can bucket (diffusion
    # tasks); a reconstruction task (Stage A, Previewer) sets False and refuses adaptive_loss_weight.
    adaptive_loss_weight: bool = True
    # The frozen encoders' outputs a latent cache stores (``latent_cache.write_cache``), in the order
    # ``conditions`` returns them; a cached batch carries exactly these.
    cached_keys: tuple[str, ...] = ()
    # The ``init`` values the task understands (``official``: the official constructors' from-scratch rules).
    inits: tuple[str, ...] = ("checkpoint", "official", "scratch")

    def checkpoint_model(self, cfg: TrainConfig) -> tuple[str, dict]:
        """(model name, constructor config) that ``generator_checkpoint_path`` must hold (checked at load)."""
        return self.generator_model, self.generator_config(cfg)

    def read_cached(self, batch: dict) -> dict:
        """``host_batch`` of a cached batch: its conditions, checked; the random choices (captions -> "",
        which samples get which conditioning) were made when the cache was written."""
        missing = [k for k in self.cached_keys if k not in batch]
        if missing:
            raise KeyError(f"cached_conditions is set but the batch lacks {missing}; it has {sorted(batch)}")
        return {k: np.asarray(batch[k]) for k in self.cached_keys}

    def cached_conditions(self, batch) -> tuple | None:
        """``conditions`` of a cached device batch (float32, in ``cached_keys`` order), None if it is not one."""
        if self.cached_keys[:1] and self.cached_keys[0] in batch:
            return tuple(batch[k].astype(jnp.float32) for k in self.cached_keys)
        return None

    def initial_loss_state(self, cfg: TrainConfig):
        """The adaptive loss-weight buckets when ``cfg.adaptive_loss_weight`` is set, else None."""
        if not cfg.adaptive_loss_weight:
            return None
        if not self.adaptive_loss_weight:
            raise ValueError(f"adaptive_loss_weight: true does not apply to stage {cfg.stage!r} "
                             f"({type(self).__name__} has no noise levels to weight); set it to false")
        return adaptive_loss_weight_init()

    def frozen_specs(self, cfg: TrainConfig) -> dict:
        """attribute -> (model name, constructor config) of every frozen model."""
        if cfg.cached_conditions:
            return {}
        if cfg.encoders is not None:
            from cascade_jax.pipelines.loading import pipeline_set

            components = pipeline_set(cfg.encoders)
            return {attr: components[attr] for attr in self.frozen}
        return {attr: (model, load_config(preset)[1]) for attr, (model, preset, _) in self.frozen.items()}

    def adapt_abstract(self, modules: TrainModules, cfg: TrainConfig) -> TrainModules:
        """For the dry run: add to the abstract models what ``build`` adds beyond them (LoRA adapters)."""
        return modules

    def abstract_modules(self, cfg: TrainConfig) -> TrainModules:
        """What ``build`` makes, as shapes only (no weights): for planning (``training/plan.py``)."""
        generator = abstract_model(self.generator_model, self.generator_config(cfg))
        if cfg.remat:
            generator.set_remat(cfg.remat)
        if cfg.dropout:
            generator.train()
        frozen = {name: abstract_model(*spec) for name, spec in self.frozen_specs(cfg).items()}
        return self.adapt_abstract(TrainModules(generator=generator, **frozen), cfg)

    def plan_batch(self, cfg: TrainConfig) -> dict:
        """name -> (global shape, dtype) of a batch of ``image_size`` squares as ``host_batch`` makes it (planning)."""
        return {"images": ((cfg.batch_size, cfg.image_size, cfg.image_size, 3), np.uint8)}

    def frozen_sources(self, cfg: TrainConfig, work_dir: Path) -> dict:
        """attribute -> where each frozen model comes from (a converted directory, or a :class:`RandomSource`),
        also for a run that does not build them (``cached_conditions``): what an export copies."""
        sources = {}
        for attr, (model, preset, path_key) in self.frozen.items():
            path = cfg.get(path_key)
            # Official CLIP keys name Hugging Face repositories; only local paths are read here.
            path = path if path is not None and storage.exists(path) else None
            sources[attr] = frozen_source(model, cfg, path, attr, work_dir, preset=preset)
        return sources

    def frozen_to_build(self, cfg: TrainConfig) -> tuple[str, ...]:
        """The frozen models ``build_frozen`` loads: the ``frozen`` table's (a subclass adds optional ones)."""
        return tuple(self.frozen)

    def build_frozen(self, cfg: TrainConfig, work_dir: Path) -> dict:
        if cfg.cached_conditions:
            return {}
        sources = self.frozen_sources(cfg, work_dir)
        return {attr: frozen_model(sources[attr], cfg) for attr in self.frozen_to_build(cfg)}

    def unsourced_spec(self, cfg: TrainConfig, attr: str) -> tuple[str, dict]:
        """(model name, config) of a frozen model built in memory with no weights file (none by default)."""
        raise ValueError(f"{type(self).__name__}: the frozen {attr!r} has no recorded source to export it from")

    def tokenizer_dir(self, cfg: TrainConfig) -> Path:
        """The CLIP tokenizer folder: ``tokenizer_path``, else the text model's folder when it has one, else the
        released BPE (``default_tokenizer_dir``)."""
        from cascade_jax.pipelines.loading import default_tokenizer_dir

        if cfg.tokenizer_path is not None:
            return Path(cfg.tokenizer_path)
        text = cfg.clip_text_model_name
        return Path(text) if text is not None and (Path(text) / "vocab.json").is_file() else default_tokenizer_dir()

    def tokenizer_for(self, cfg: TrainConfig):
        from cascade_jax.data.clip_tokenizer import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.tokenizer_dir(cfg))

    def exports(self, cfg: TrainConfig) -> bool:
        """Whether ``train/*.py`` export the run as a weights folder at its end (``--export``)."""
        return True

    def output_hooks(self, cfg: TrainConfig) -> list:
        """Hooks (``training/hooks.py``) that write what the task makes besides checkpoints and the export (a
        LoRA file); ``train/*.py`` add them to the run and print each one's ``summary()`` at the end."""
        return []

    def build(self, cfg: TrainConfig) -> TrainModules:
        raise NotImplementedError

    def trainable(self, cfg: TrainConfig):
        return generator_filter(cfg.train_filter)

    def host_batch(self, cfg: TrainConfig, batch: dict, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def loss(self, modules: TrainModules, batch: dict, key, loss_state, cfg: TrainConfig):
        raise NotImplementedError

    def generator_config(self, cfg: TrainConfig) -> dict:
        if isinstance(cfg.model_config, dict):
            return dict(cfg.model_config)
        preset = cfg.model_config or self.versions.get(cfg.model_version)
        if preset is None:
            raise ValueError(f"model_version {cfg.model_version!r} is not one of {sorted(self.versions)}; "
                             "or set model_config to a preset name or file")
        return load_config(preset)[1]

    def export_model(self, cfg: TrainConfig) -> tuple[str, dict]:
        """(model name, constructor config) of the trained generator, as an export writes it."""
        return self.generator_model, self.generator_config(cfg)

    def build_generator(self, cfg: TrainConfig, work_dir: Path):
        config = self.generator_config(cfg)
        if cfg.init in ("official", "scratch"):
            model = random_model(self.generator_model, config, seed=cfg.seed, dtype=cfg.param_dtype)
            if cfg.init == "official":
                from cascade_jax.training.init import official_init

                official_init(model, self.generator_model, config, seed=cfg.seed)
        else:
            from cascade_jax.training.run_checks import check_init

            check_init(cfg, self)  # never random weights for init: checkpoint without a path
            model = load_weights(self.generator_model, config, cfg.generator_checkpoint_path, work_dir,
                                 cfg.param_dtype)
        if cfg.remat:
            model.set_remat(cfg.remat)
        if cfg.dropout:
            model.train()
        return model


def unroll_stacked(modules: TrainModules):
    """Stacked units and layers run as straight-line code (no loops): the same program as scanned for XLA's
    cost model, which has no estimate for a loop (``training/plan_estimate.py``)."""
    for _, node in nnx.iter_graph(modules):
        if isinstance(node, (CascadeUNet, CLIPEncoder)):
            node.unroll_stacked = True
    return modules


def stack_for_scan(modules: TrainModules, cfg: TrainConfig) -> dict:
    """With ``scan_blocks``: every U-Net of the task (the trained one, a ControlNet's frozen Stage C) keeps its
    repeated units stacked (``models/unet_stack.py``), in place. Returns ``{attribute: layout}`` (empty without
    scan_blocks), how each was stacked, for what reads parameters by path (the LoRA writer: ``Run.stack_layouts``).
    Exports unstack (``training/export.py``)."""
    if not cfg.scan_blocks:
        return {}
    if cfg.train_filter:
        raise ValueError(f"train_filter={list(cfg.train_filter)} selects blocks by official name, which scan_blocks "
                         "stacks into one array per run of identical blocks: use one of them, not both")
    unets = {name: getattr(modules, name) for name in modules.names if isinstance(getattr(modules, name), CascadeUNet)}
    if not unets:
        raise ValueError(f"scan_blocks applies to the Stage B / C U-Nets; stage {cfg.stage!r} has none: leave it unset")
    layouts = {name: stack_units(unet) for name, unet in unets.items()}
    # The frozen CLIP encoders' layers too (nothing reads their parameters by key).
    encoders = [node for name in modules.names if name != "generator"
                for _, node in nnx.iter_graph(getattr(modules, name)) if isinstance(node, CLIPEncoder)]
    for encoder in encoders:
        encoder.stack_layers()
    return layouts


class RandomSource(NamedTuple):
    """A frozen model with seeded random weights: ``component`` of the pipeline set ``set_name`` (``encoders``),
    the same in every task and in ``StableCascadePipeline.random(set_name)`` (``random_component``)."""

    set_name: str
    component: str

    def model(self, dtype: str = "float32") -> nnx.Module:
        from cascade_jax.pipelines.loading import random_component

        return random_component(self.set_name, self.component, dtype=dtype)

    def __str__(self) -> str:
        return f"random weights: the {self.component} of the pipeline set {self.set_name!r}"


def converted_dir(model_name: str, config, path, work_dir: Path) -> "Path | str":
    """``path`` if it is a converted directory (a local one, or a URL in a bucket), else its conversion
    (float32) into ``work_dir/converted``, made on first use from official/diffusers/transformers files."""
    from cascade_jax.weights.checkpoint import META_FILE
    from cascade_jax.weights.convert import convert_checkpoint

    if storage.is_url(path) and storage.isfile(storage.join(path, META_FILE)):
        return path  # a converted directory in a bucket: restored in place
    path = storage.local_copy(path) if storage.is_url(path) and storage.exists(path) else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{model_name}: checkpoint {path} does not exist; give a converted directory, "
                                "an official .safetensors file or a diffusers/transformers folder")
    if (path / META_FILE).is_file():
        return path
    out = work_dir / "converted" / f"{model_name}-{path.stem}"
    if not (out / META_FILE).is_file():
        convert_checkpoint(model_name, config, path, out, dtype="float32")
    return out


def load_weights(model_name: str, config, path, work_dir: Path, dtype: str):
    """A model from a converted directory, or converted on first use from official/diffusers/transformers files."""
    from cascade_jax.weights.checkpoint import load_model

    return load_model(converted_dir(model_name, config, path, work_dir), dtype=dtype)


def frozen_source(model_name: str, cfg: TrainConfig, path, set_component: str, work_dir: Path, *,
                  preset: str) -> "Path | str | RandomSource":
    """Where a frozen model comes from: ``path`` (converted on first use), or random weights of the
    ``encoders`` pipeline set (tests)."""
    if path is not None:
        return converted_dir(model_name, load_config(preset)[1], path, work_dir)
    if cfg.encoders is not None:
        return RandomSource(cfg.encoders, set_component)
    raise ValueError(f"no weights for the frozen {model_name}: set its *_checkpoint_path (or `encoders: tiny` "
                     "for random test weights)")


def frozen_model(source, cfg: TrainConfig) -> nnx.Module:
    """The frozen model of a :func:`frozen_source`, in the compute dtype and eval mode."""
    from cascade_jax.weights.checkpoint import load_model

    model = source.model(compute_dtype(cfg)) if isinstance(source, RandomSource) else \
        load_model(source, dtype=compute_dtype(cfg))
    model.eval()
    return model


def param_dtype(module: nnx.Module):
    """The dtype of a module's first parameter (what its inputs are cast to)."""
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        return var.dtype
    return np.float32


def work_dir(cfg: TrainConfig) -> Path:
    """The local folder where checkpoints given as official files are converted on first use:
    ``output_path``, or the local cache when that is a bucket URL."""
    return storage.cache_root() / "training" if storage.is_url(cfg.output_path) else Path(cfg.output_path)


def compute_dtype(cfg: TrainConfig) -> str:
    return cfg.compute_dtype or cfg.dtype or "float32"
