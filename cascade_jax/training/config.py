"""Training configuration: one frozen, typed object read from YAML with the official keys.

The official ``configs/training/*.yaml`` keys are accepted as they are (``lr``, ``batch_size``,
``image_size``, ``multi_aspect_ratio``, ``grad_accum_steps``, ``updates``, ``warmup_updates``,
``save_every``, ``backup_every``, ``adaptive_loss_weight``, ``ema_*``, ``webdataset_path``,
``dataset_filters``, the ``*_checkpoint_path`` keys ...); this project's own keys sit beside
them (``stage``, ``mesh``, ``param_dtype``, ``remat``, ``data``, ``seed``, logging). An unknown
key is an error naming the closest valid one; ``key=value`` overrides (dotted for nested
sections: ``mesh.fsdp=8``) are YAML values (``cascade_jax.training.overrides``: ``1e-4`` is a number,
brace ranges are text). Every field is read as its annotation says, or refused by name
(``cascade_jax.data.config_values``): ``lr: "5e-4"`` is a number, ``webdataset_path: /d/x.tar`` one path.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from cascade_jax import storage
from cascade_jax.data.config import DataConfig
from cascade_jax.data.config_values import coerce_dataclass_fields, coerce_mapping, list_fields
from cascade_jax.models.config_yaml import load_yaml
from cascade_jax.training.controlnet_config import ControlNetConfig
from cascade_jax.training.lora_config import LoraConfig
from cascade_jax.training.overrides import apply_overrides
from cascade_jax.training.reconstruction_config import ReconstructionConfig
from cascade_jax.training.validation import ConfigError, check_values

# Accepted for compatibility with the official files, and not used: they configure the official
# trainer's infrastructure (Weights & Biases, torch FSDP), which a mesh and TensorBoard replace.
IGNORED_OFFICIAL_KEYS = ("wandb_project", "wandb_entity", "use_fsdp", "captions_getter")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (``-1``: the devices left over) over the axes (data, fsdp, tensor)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        coerce_dataclass_fields(self, "mesh.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # --- official keys (StableCascade configs/training) ---
    experiment_id: str = "cascade_jax"
    checkpoint_path: str = "checkpoints"
    output_path: str = "output"
    model_version: str = "3.6B"  # Stage C: 3.6B | 1B; Stage B: 3B | 700M; or a preset/file via model_config
    lr: float = 1e-4
    batch_size: int = 8  # global, over all hosts and micro-batches
    image_size: int = 768
    multi_aspect_ratio: tuple | None = None
    grad_accum_steps: int = 1
    updates: int = 1000
    warmup_updates: int = 1
    save_every: int = 2000
    backup_every: int = 20000
    adaptive_loss_weight: bool = False
    ema_start_iters: int | None = None
    ema_iters: int | None = None
    ema_beta: float | None = None
    shift: float = 1.0  # Stage B configs set 4; the official train_b.py diffuses with shift 1 regardless
    dtype: str | None = None  # official: the dtype of the frozen models; here compute_dtype wins if set
    webdataset_path: tuple[str, ...] | None = None  # one path (official: a string) or a list
    dataset_filters: tuple | None = None
    generator_checkpoint_path: str | None = None
    effnet_checkpoint_path: str | None = None
    previewer_checkpoint_path: str | None = None
    stage_a_checkpoint_path: str | None = None
    clip_text_model_name: str | None = None  # a converted dir, a transformers folder or safetensors file
    clip_image_model_name: str | None = None
    # Stage B: latent sides that get pyramid-noise octaves (official [1, 16] for 256x256 latents, where the
    # white noise keeps ~82% of the variance; a 32x32 latent needs ~[1, 2] for the same); null: plain Gaussian
    pyramid_noise_sizes: tuple[int, ...] | None = (1, 16)
    tokenizer_path: str | None = None  # CLIP tokenizer folder; default: the text model's folder, else the released BPE
    # --- per-task sections; their official keys load flat as the official configs write them (SECTIONS) ---
    controlnet: ControlNetConfig = ControlNetConfig()  # stage c_controlnet (official train_c_controlnet.py)
    lora: LoraConfig = LoraConfig()  # stage c_lora (official train_c_lora.py)
    reconstruction: ReconstructionConfig = ReconstructionConfig()  # stages a and previewer
    lcm: dict | None = None  # stages c_lcm, b_lcm: consistency distillation settings (cascade_jax.training.lcm_config)
    # --- this project's keys ---
    stage: str = "c"  # c | b | a | previewer | c_lora | c_controlnet | c_lcm | b_lcm
    model_config: str | dict | None = None  # generator preset/file or its kwargs; default from model_version
    encoders: str | None = None  # pipeline set (e.g. "tiny") for frozen models without checkpoint paths
    init: str = "checkpoint"  # checkpoint | official (from scratch, official init) | scratch (all random: tests)
    train_filter: tuple[str, ...] = ()  # regexes over official names of the generator; empty: all of it trains
    mesh: MeshConfig = MeshConfig()
    sharding_rules: dict | None = None
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "bfloat16"
    moment_dtype: str | None = None  # "bfloat16" stores the first AdamW moment in bf16
    remat: Any = None  # None | "full" | a jax.checkpoint_policies name
    # Stage B / C: run each level's repeated blocks as one scan (same parameters and results; the step compiles
    # in minutes for a 3.6B model instead of not at all; XLA:CPU runs loops slower, so off for CPU runs)
    scan_blocks: bool = False
    dropout: bool = True  # train with the model's configured dropout (official 0.1 for Stage C)
    cached_conditions: bool = False  # batches carry precomputed latents/embeddings: no frozen encoders run
    weight_decay: float = 0.01  # torch AdamW default (the official trainer leaves it)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 42
    data: dict | None = None  # cascade_jax.data.DataConfig fields
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    log_every: int = 10
    sample_every: int | None = None  # write a sample collage every N updates (None/0: never; training/samples.py)
    # Stage C collage prompts (None: captions of the training data); their count is also the number of Stage B
    # reconstructions (None: samples.SAMPLE_COUNT)
    sample_prompts: tuple[str, ...] | None = None
    sample_steps: int = 10  # sampler steps per collage (official inference: Stage C 20, Stage B 10)
    loss_smoothing: float = 0.99  # the official "ema_loss" factor
    peak_flops: float | None = None  # per-device peak FLOP/s for the MFU estimate (None: guess from device kind)
    # A per-pixel loss-weight plug-in ({function: "module:name", ...its keyword arguments}; None: every pixel
    # weighs 1): the reconstruction error of Stage A / the Previewer and the denoising error of Stage B / C
    # (cascade_jax.training.pixel_weights). Logged losses stay the plain MSE.
    pixel_weights: dict | None = None

    def __post_init__(self):
        coerce_dataclass_fields(self)  # first: the checks below compare numbers, not the text a user typed
        if self.data is not None:
            object.__setattr__(self, "data", coerce_mapping(DataConfig, self.data, "data."))
        if self.lcm is not None:
            from cascade_jax.training.lcm_config import lcm_config

            lcm_config(self.lcm)  # refused by name at load, before any model is built
        if self.pixel_weights is not None:
            from cascade_jax.training.pixel_weights import check_pixel_weights

            check_pixel_weights(self.pixel_weights)
        check_values(self)  # every value check lives there: one place, run before anything is built

    def get(self, key: str):
        """The value of ``key`` as the official configs name it: a base field or a section's (``rank``)."""
        section = SECTION_OF_KEY.get(key)
        return getattr(getattr(self, section) if section else self, key)

    @property
    def use_ema(self) -> bool:
        return self.ema_iters is not None

    def data_config(self) -> dict:
        """The data section, with the official flat keys mapped in (``webdataset_path`` -> ``paths``...)."""
        data = dict(self.data or {})
        if self.webdataset_path and "paths" not in data:
            data.setdefault("source", "webdataset")
            data["paths"] = list(self.webdataset_path)
        if self.dataset_filters and "filters" not in data:
            data["filters"] = list(self.dataset_filters)
        return data

    def to_dict(self) -> dict:
        """Every field, the sections' keys flat as the official configs write them (what a checkpoint stores)."""
        values = dataclasses.asdict(self)
        for name in SECTIONS:
            values.update(values.pop(name))
        return values


# Section field -> its class. A section's keys are valid at the top level too (the official flat form).
SECTIONS = {"controlnet": ControlNetConfig, "lora": LoraConfig, "reconstruction": ReconstructionConfig}
SECTION_OF_KEY = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _check_keys(cls, values: dict, where: str):
    valid = [f.name for f in dataclasses.fields(cls)] + (list(SECTION_OF_KEY) if cls is TrainConfig else [])
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ValueError(f"{where}: unknown config key {key!r}; {hint}")


def config_from_dict(values: dict, where: str = "training config") -> TrainConfig:
    values = {k: v for k, v in values.items() if k not in IGNORED_OFFICIAL_KEYS}
    _check_keys(TrainConfig, values, where)
    mesh = values.pop("mesh", None) or {}
    if not isinstance(mesh, (dict, MeshConfig)):
        raise ValueError(f"{where}: mesh must be a mapping of data/fsdp/tensor sizes, got {mesh!r}")
    if isinstance(mesh, dict):
        _check_keys(MeshConfig, mesh, f"{where}: mesh")
        mesh = MeshConfig(**mesh)
    try:
        return TrainConfig(mesh=mesh, **_sections(values))
    except ValueError as err:  # a value read as its type (config_values) or checked (validation): name the file
        raise ConfigError(f"{where}: {err}") from None


def _sections(values: dict) -> dict:
    """``values`` with each section built from its nested mapping and its keys given flat (official form)."""
    values = dict(values)
    for name, cls in SECTIONS.items():
        nested = values.pop(name, None) or {}
        if isinstance(nested, cls):
            nested = dataclasses.asdict(nested)
        if not isinstance(nested, dict):
            raise ValueError(f"{name} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, "
                             f"got {nested!r}")
        _check_keys(cls, nested, name)
        flat = {key: values.pop(key) for key in list(values) if SECTION_OF_KEY.get(key) == name}
        both = sorted(set(flat) & set(nested))
        if both:
            raise ValueError(f"{both[0]} is given both at the top level and in {name}: keep one")
        values[name] = cls(**nested, **flat)
    return values


# Keys whose repeated overrides join into one list (an unquoted brace range expanded by the shell).
LIST_KEYS = frozenset(list_fields(TrainConfig) + [f"data.{name}" for name in list_fields(DataConfig)]
                      + [k for name, cls in SECTIONS.items() for f in list_fields(cls) for k in (f, f"{name}.{f}")])


def load_config(path_or_name, overrides=()) -> TrainConfig:
    """A config from a YAML file (a path or bucket URL) or the name of one in ``configs/training/``, with
    ``key=value`` overrides."""
    # A config in a bucket is read from a cached local copy (a missing object: FileNotFoundError naming the URL).
    path = storage.local_copy(path_or_name) if storage.is_url(path_or_name) else Path(path_or_name)
    if not path.is_file():
        path = training_configs_dir() / f"{path_or_name}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in training_configs_dir().glob("*.yaml"))
            raise FileNotFoundError(f"training config {path_or_name!r} is neither a file nor one of {names}")
    values = read_yaml_file(path)
    if values is None:
        raise ValueError(f"{path} is empty: a training config names at least the model and the data; start from "
                         f"one in {training_configs_dir()} (e.g. tiny_c.yaml, finetune_c_3b.yaml)")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return config_from_dict(apply_overrides(values, overrides, LIST_KEYS), where=str(path))


def read_yaml_file(path: Path):
    """The parsed file, or a ValueError naming the file and the line and column of a syntax error
    (PyYAML's own message points at "<unicode string>" when given the text)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file ({err}); a training config is YAML") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise ValueError(f"{where}: not valid YAML ({problem or err}); fix the file") from None


def training_configs_dir() -> Path:
    from cascade_jax.models.registry import configs_root

    return configs_root() / "training"
