"""Checks of a training config that need its task or the disk, run before data, models or compiles.

:mod:`cascade_jax.training.validation` checks values on their own; this module checks them against
what they name: ``init`` against the generator weights the task would load, the weights files
against the configured model (from their headers, with both sides' ResBlocks and widths on a
mismatch), ``controlnet_blocks`` against the abstract Stage C, and the export folder. Each costs
at most an abstract model (about a second for the 3.6B Stage C), never a compile.
"""

from __future__ import annotations

from pathlib import Path

from cascade_jax.training.config import TrainConfig
from cascade_jax.training.validation import ConfigError

INIT_MEANINGS = {"scratch": "init: scratch (every parameter random)",
                 "official": "init: official (the official constructors' from-scratch initialisation)"}


def check_run(cfg: TrainConfig, task) -> None:
    """Everything :func:`cascade_jax.training.train` needs to hold before it reads data or builds a model."""
    check_init(cfg, task)
    check_weight_paths(cfg, task)
    check_generator_weights(cfg, task)
    check_controlnet_blocks(cfg, task)


def _is_url(path) -> bool:
    return "://" in str(path)


def check_init(cfg: TrainConfig, task) -> None:
    """``init`` is one the task knows, and ``init: checkpoint`` names the weights it starts from."""
    name = type(task).__name__
    if cfg.init not in task.inits:
        raise ConfigError(f"init: {cfg.init} does not apply to stage {cfg.stage!r} ({name}); use one of "
                          f"{', '.join(task.inits)}")
    if cfg.init == "checkpoint" and cfg.generator_checkpoint_path is None:
        model = task.checkpoint_model(cfg)[0]
        others = " or ".join(INIT_MEANINGS[i] for i in task.inits if i in INIT_MEANINGS)
        raise ConfigError(f"init: checkpoint (the default) needs generator_checkpoint_path: the {model} weights "
                          f"stage {cfg.stage!r} trains from (an official .safetensors file or a converted folder). "
                          f"Set it, or set {others} to train without them")


def check_weight_paths(cfg: TrainConfig, task) -> None:
    """Every local weights path the task reads exists (a typo would otherwise fall back to random weights)."""
    keys = ["generator_checkpoint_path", "controlnet_checkpoint_path", "lora_checkpoint_path"]
    if not cfg.cached_conditions:
        frozen = {**task.frozen, **getattr(task, "optional_frozen", {})}
        # The CLIP keys may name Hugging Face repositories (officially they do): only *_checkpoint_path are paths.
        keys += [key for _, _, key in frozen.values() if key.endswith("_checkpoint_path")]
    for key in keys:
        path = cfg.get(key)
        if path is not None and not _is_url(path) and not Path(path).exists():
            raise FileNotFoundError(f"{key}={path}: no such file or folder (relative paths start at "
                                    f"{Path.cwd()}); give an official .safetensors file or a converted folder")


def check_generator_weights(cfg: TrainConfig, task) -> None:
    """The generator weights fit the configured model: read from a converted folder's metadata or the
    safetensors header; a mismatch names both sides' ResBlocks and widths."""
    path = cfg.generator_checkpoint_path
    if cfg.init != "checkpoint" or path is None or _is_url(path):
        return
    from cascade_jax.weights.checkpoint import META_FILE, read_meta

    model, config = task.checkpoint_model(cfg)
    path = Path(path)
    if not (path / META_FILE).is_file():
        from cascade_jax.weights.convert import ConversionError, check_source

        try:
            check_source(model, config, path)
        except ConversionError as err:
            raise ConfigError(f"generator_checkpoint_path: {err}\nThe model comes from model_version / "
                              "model_config; make them describe this checkpoint") from None
        return
    meta = read_meta(path)
    if meta["model"] != model:
        raise ConfigError(f"generator_checkpoint_path={path} holds a {meta['model']} model; stage {cfg.stage!r} "
                          f"needs a {model}")
    _compare_configs(path, model, meta["config"], config)


def _compare_configs(path: Path, model: str, stored: dict, configured: dict) -> None:
    from cascade_jax.models.registry import abstract_model
    from cascade_jax.models.structure import describe_unet, model_shapes
    from cascade_jax.nn.params import named_variables

    theirs, ours = abstract_model(model, stored), abstract_model(model, configured)
    shapes = ({k: tuple(v.shape) for k, v in named_variables(m).items()} for m in (theirs, ours))
    theirs_shapes, ours_shapes = shapes
    if theirs_shapes == ours_shapes:
        return
    differing = sorted(set(theirs_shapes) ^ set(ours_shapes)) or \
        [k for k in ours_shapes if theirs_shapes[k] != ours_shapes[k]]
    raise ConfigError(
        f"generator_checkpoint_path={path} holds another {model} than the config describes "
        f"({len(differing)} tensors differ, e.g. {differing[:3]}):\n"
        f"  the checkpoint: {describe_unet(model_shapes(theirs)) or stored}\n"
        f"  the config:     {describe_unet(model_shapes(ours)) or configured}\n"
        "Set model_version / model_config to the checkpoint's model (its cascade_model.json holds the config)")


def check_controlnet_blocks(cfg: TrainConfig, task) -> None:
    """``controlnet_blocks`` are ResBlocks of the configured Stage C whose width the ControlNet projects to."""
    if task.generator_model != "controlnet":
        if cfg.controlnet.controlnet_blocks is not None:
            raise ConfigError(f"controlnet_blocks is set but stage {cfg.stage!r} trains no ControlNet; remove it, "
                              "or train with stage c_controlnet (train/train_c_controlnet.py)")
        return
    from cascade_jax.models.registry import abstract_model
    from cascade_jax.pipelines.controlnet import resblock_widths

    check_controlnet_filter(cfg)
    if not cfg.controlnet.controlnet_blocks:
        raise ConfigError("controlnet_blocks is required: the Stage C ResBlock indices that get a residual")
    stage_c = abstract_model("stage_c", task.generator_config(cfg))
    widths = resblock_widths(stage_c)
    width = int(stage_c.embedding[1].weight.shape[-1])  # the ControlNet's c_proj
    fitting = [i for i, w in enumerate(widths) if w == width]
    bad = [i for i in cfg.controlnet.controlnet_blocks if i >= len(widths) or widths[i] != width]
    if bad:
        raise ConfigError(f"controlnet_blocks {list(cfg.controlnet.controlnet_blocks)}: {bad} do not fit this Stage C, which "
                          f"has {len(widths)} ResBlocks (indices 0..{len(widths) - 1}, widths {sorted(set(widths))}); "
                          f"a residual of width {width} goes into the ResBlocks of that width: {_ranges(fitting)}")


def check_controlnet_filter(cfg: TrainConfig) -> None:
    """A ControlNet run names a filter that can make its hints from the training images."""
    from cascade_jax.data import hints

    if cfg.controlnet.controlnet_filter is None:
        raise ConfigError("controlnet_filter is required: CannyFilter, InpaintFilter or SREffnetFilter")
    if cfg.controlnet.controlnet_filter == "IdentityFilter":
        raise ConfigError("IdentityFilter training needs face boxes and ArcFace embeddings for every image, which "
                          f"the data loader does not provide ({hints.identity.FACE_MODELS_MISSING})")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(f"{start}-{index}" if index > start else f"{start}")
            start = None
    return ", ".join(parts) or "none"


def check_export_folder(out_dir, cfg: TrainConfig) -> None:
    """The folder the end of training exports to may be written (checked at load, not after training): new,
    empty, or this run's earlier export holding nothing else (``cascade_jax.training.export_folder``)."""
    from cascade_jax.storage import StorageError
    from cascade_jax.training import export_folder

    try:
        export_folder.check_export_folder(out_dir, cfg)
    except (OSError, ValueError, StorageError) as err:
        raise ConfigError(f"cannot export to {out_dir} at the end of training: {err}") from None
