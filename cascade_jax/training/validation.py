"""Every check of a training config's values, in one place, run at load before anything is built.

``check_values(cfg)`` runs in ``TrainConfig.__post_init__``, after each value was read as its field's
type (``cascade_jax.data.config_values``): ranges and choices of single keys and
contradictions between keys, without reading a file or building a model, so a bad value is named
before the minutes of model building and compiling it would otherwise cost (``updates=0`` used to
export random weights, ``save_every=0`` to crash after the compile, ``rank=0`` to divide by zero).
What needs the task or the disk (``init`` against the generator's weights, ``controlnet_blocks``
against the Stage C's structure) is :mod:`cascade_jax.training.run_checks`.
"""

from __future__ import annotations

import math
import re

DTYPES = ("float32", "bfloat16")  # float16 overflows in these models (DESIGN.md): refused
CONTROLNET_FILTERS = ("CannyFilter", "InpaintFilter", "SREffnetFilter", "IdentityFilter")
BOTTLENECK_MODES = ("effnet", "simple", "large")
# The official filter constructors' keyword arguments (plus ``saliency``, this project's weights path).
FILTER_PARAMS = {"CannyFilter": ("resize",), "InpaintFilter": ("thresold", "p_outpaint", "saliency"),
                 "SREffnetFilter": ("scale_factor",), "IdentityFilter": ("max_faces", "p_drop", "p_full")}


class ConfigError(ValueError):
    """A config value that cannot train; the message names the key, the value and what to use."""


def check_values(cfg) -> None:
    """Raise :class:`ConfigError` for the first value of ``cfg`` (a ``TrainConfig``) that cannot train."""
    for check in (_check_counts, _check_numbers, _check_dtypes, _check_keys_with_choices,
                  _check_patterns, _check_controlnet, _check_contradictions):
        check(cfg)


def _shown(value):
    """A value as the user wrote it: YAML lists are stored as tuples."""
    return [_shown(v) for v in value] if isinstance(value, (list, tuple)) else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(cfg, name: str, low: int, what: str, *, optional: bool = False, high: int | None = None):
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if not _is_int(value) or value < low or (high is not None and value >= high):
        bound = f">= {low}" + (f" and < {high}" if high is not None else "")
        raise ConfigError(f"{name}={value!r}: use a whole number {bound} ({what})"
                          + (" or null" if optional else ""))


def _check_counts(cfg):
    _integer(cfg, "updates", 1, "the optimizer updates to train")
    _integer(cfg, "batch_size", 1, "images per update, over all hosts")
    _integer(cfg, "grad_accum_steps", 1, "micro-batches per update")
    _integer(cfg, "warmup_updates", 0, "updates of linear lr warm-up")
    _integer(cfg, "save_every", 1, "a checkpoint every N updates")
    _integer(cfg, "log_every", 1, "a log line every N updates")
    _integer(cfg, "keep_checkpoints", 1, "the newest checkpoints kept")
    _integer(cfg, "image_size", 1, "the side of the square training bucket, in pixels")
    _integer(cfg.lora, "rank", 1, "the LoRA rank")
    _integer(cfg, "seed", 0, "the random seed", high=2**32)
    if cfg.backup_every is not None and (not _is_int(cfg.backup_every) or cfg.backup_every < 0):
        raise ConfigError(f"backup_every={cfg.backup_every!r}: use a whole number of updates >= 1 (0 or null: "
                          "keep no backups beyond keep_checkpoints)")
    if cfg.sample_every is not None and (not _is_int(cfg.sample_every) or cfg.sample_every < 0):
        raise ConfigError(f"sample_every={cfg.sample_every!r}: use a number of updates >= 0 (0 or null: no samples)")
    _integer(cfg, "sample_steps", 1, "sampler steps per collage")
    _integer(cfg, "ema_start_iters", 0, "micro-iterations before the EMA starts", optional=True)
    _integer(cfg, "ema_iters", 1, "micro-iterations between EMA updates", optional=True)
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of grad_accum_steps {cfg.grad_accum_steps}")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        if not _is_int(size) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{axis}={size!r}: use a device count >= 1, or -1 for the devices left over")


def _number(cfg, name: str, low: float, high: float = math.inf, *, low_open=False, high_open=False,
            optional=False, what: str = ""):
    value = getattr(cfg, name)
    if value is None and optional:
        return
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        low_text = f"{'>' if low_open else '>='} {low:g}"
        high_text = "" if high == math.inf else f" and {'<' if high_open else '<='} {high:g}"
        raise ConfigError(f"{name}={value!r}: use a finite number {low_text}{high_text}" + (f" ({what})" if what else "")
                          + (" or null" if optional else ""))


def _check_numbers(cfg):
    _number(cfg, "lr", 0, low_open=True, what="the peak learning rate, e.g. 1e-4")
    _number(cfg, "weight_decay", 0, what="AdamW's decoupled weight decay; torch's default 0.01")
    _number(cfg, "adam_eps", 0, low_open=True, what="AdamW's epsilon, e.g. 1e-8")
    _number(cfg, "grad_clip", 0, what="the gradient-norm clip; 0 turns clipping off")
    _number(cfg, "shift", 0, low_open=True, what="the noise-schedule shift; 1 in training")
    _number(cfg, "loss_smoothing", 0, 1, high_open=True, what="the smoothed loss's EMA factor, e.g. 0.99")
    _number(cfg, "ema_beta", 0, 1, optional=True, what="the EMA decay")
    _number(cfg.controlnet, "offset_noise", 0, optional=True, what="the std of the per-channel offset noise")
    _number(cfg.reconstruction, "vq_beta", 0, what="the VQ commitment weight")
    _number(cfg.reconstruction, "l1_weight", 0, what="the weight of the L1 reconstruction term")
    _number(cfg, "peak_flops", 0, low_open=True, optional=True, what="per-device peak FLOP/s for the MFU")


def _check_dtypes(cfg):
    # The official ``dtype`` key only matters here when compute_dtype is null (compute_dtype wins).
    checked = [("param_dtype", False), ("compute_dtype", True), ("moment_dtype", True)]
    if cfg.compute_dtype is None:
        checked.append(("dtype", True))
    elif cfg.dtype is not None and not isinstance(cfg.dtype, str):
        raise ConfigError(f"dtype={cfg.dtype!r}: use a dtype name such as bfloat16 (compute_dtype overrides it)")
    for name, optional in checked:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if value not in DTYPES:
            hint = " (float16 overflows in these models)" if value == "float16" else ""
            raise ConfigError(f"{name}={value!r}: use one of {', '.join(DTYPES)}" + (" or null" if optional else "")
                              + hint)


def _check_keys_with_choices(cfg):
    from cascade_jax.data.buckets import parse_ratio

    if cfg.multi_aspect_ratio is not None:
        if not isinstance(cfg.multi_aspect_ratio, (list, tuple)) or not cfg.multi_aspect_ratio:
            raise ConfigError(f"multi_aspect_ratio={_shown(cfg.multi_aspect_ratio)!r}: use a list of ratios such as "
                              "[1/1, 9/16] (or null for one square bucket)")
        for ratio in cfg.multi_aspect_ratio:
            try:
                parse_ratio(ratio)
            except ValueError as err:
                raise ConfigError(f"multi_aspect_ratio: {err}") from None
    if cfg.remat is not None:
        from cascade_jax.models.unet import remat_policy

        try:
            remat_policy(cfg.remat)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for name in ("experiment_id", "checkpoint_path", "output_path", "stage"):
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name}={value!r}: use a non-empty string")
    if "/" in cfg.experiment_id or cfg.experiment_id in (".", ".."):
        raise ConfigError(f"experiment_id={cfg.experiment_id!r}: use a plain name (it becomes a folder under "
                          "checkpoint_path and output_path)")


def _compile(pattern, key: str):
    if not isinstance(pattern, str):
        raise ConfigError(f"{key}: {pattern!r} is not a regular expression string")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({err})") from None


def _check_patterns(cfg):
    for pattern in cfg.train_filter or ():
        _compile(pattern, "train_filter")
    if cfg.lora.module_filters is not None and (not isinstance(cfg.lora.module_filters, (list, tuple)) or
                                           not all(isinstance(f, str) and f for f in cfg.lora.module_filters)):
        raise ConfigError(f"module_filters={_shown(cfg.lora.module_filters)!r}: use a list of module-name substrings such as "
                          "['.attn'] (or null)")
    for entry in cfg.lora.train_tokens or ():
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ConfigError(f"train_tokens: {_shown(entry)!r} is not a [token or regex, init regex or null] pair; e.g. "
                              "[['[fernando]', '^dog</w>']]")
        token, init = entry
        new = isinstance(token, str) and token[:1] + token[-1:] in ("[]", "<>")
        if not new:  # an existing-token selector is a regex over the vocabulary
            _compile(token, "train_tokens")
        if init is not None:
            _compile(init, f"train_tokens (the init regex of {token!r})")


def _check_controlnet(cfg):
    if cfg.controlnet.controlnet_blocks is not None:
        blocks = cfg.controlnet.controlnet_blocks
        if not isinstance(blocks, (list, tuple)) or not blocks or not all(_is_int(b) and b >= 0 for b in blocks):
            raise ConfigError(f"controlnet_blocks={_shown(blocks)!r}: use a list of Stage C ResBlock indices >= 0, "
                              "e.g. [0, 4, 8, 12, 51, 55, 59, 63]")
    if cfg.controlnet.controlnet_bottleneck_mode is not None and cfg.controlnet.controlnet_bottleneck_mode not in BOTTLENECK_MODES:
        raise ConfigError(f"controlnet_bottleneck_mode={cfg.controlnet.controlnet_bottleneck_mode!r}: use one of "
                          f"{', '.join(BOTTLENECK_MODES)} (or null: effnet)")
    if cfg.controlnet.controlnet_filter is not None and cfg.controlnet.controlnet_filter not in CONTROLNET_FILTERS:
        raise ConfigError(f"controlnet_filter={cfg.controlnet.controlnet_filter!r}: use one of {', '.join(CONTROLNET_FILTERS)}")
    params = cfg.controlnet.controlnet_filter_params
    if params is None:
        return
    if not isinstance(params, dict):
        raise ConfigError(f"controlnet_filter_params={params!r}: use a mapping such as {{resize: 224}}")
    allowed = FILTER_PARAMS.get(cfg.controlnet.controlnet_filter, sum(FILTER_PARAMS.values(), ()))
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(f"controlnet_filter_params.{key}: not a parameter of {cfg.controlnet.controlnet_filter}; "
                              f"it takes {', '.join(allowed)}")
        _check_filter_param(key, value)


def _check_filter_param(key: str, value):
    name = f"controlnet_filter_params.{key}={value!r}"
    if key in ("resize", "max_faces"):
        if not (value is None and key == "resize") and not (_is_int(value) and value >= 1):
            raise ConfigError(f"{name}: use a whole number >= 1" + (" (pixels) or null" if key == "resize" else ""))
    elif key in ("p_outpaint", "p_drop", "p_full"):
        if not (_is_number(value) and 0 <= value <= 1):
            raise ConfigError(f"{name}: use a probability in [0, 1]")
    elif key == "scale_factor":
        if not (_is_number(value) and 0 < value <= 1):
            raise ConfigError(f"{name}: use a downscale factor in (0, 1], officially 0.5")
    elif key == "thresold":  # (sic: the official key)
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
        if not ok or not 0 <= value[0] <= value[1] <= 1:
            raise ConfigError(f"{name}: use [low, high] with 0 <= low <= high <= 1, officially [0.04, 0.4]")
    elif key == "saliency" and value is not None and not isinstance(value, str):
        raise ConfigError(f"{name}: use the path of the saliency weights (or null: random masks)")


def _check_contradictions(cfg):
    if cfg.init not in ("checkpoint", "official", "scratch"):
        raise ConfigError(f"init={cfg.init!r}: use 'checkpoint', 'official' (from scratch as the official "
                          "constructors initialise) or 'scratch' (every parameter random, for tests)")
    if cfg.init != "checkpoint" and cfg.generator_checkpoint_path is not None:
        raise ConfigError(f"init={cfg.init!r} and generator_checkpoint_path={cfg.generator_checkpoint_path!r} "
                          f"contradict each other: init: {cfg.init} starts from random weights and would ignore the "
                          "checkpoint. Keep the path with init: checkpoint, or remove generator_checkpoint_path")
    if (cfg.ema_start_iters is None) != (cfg.ema_iters is None) or \
            (cfg.ema_iters is not None and cfg.ema_beta is None):
        raise ConfigError("EMA needs all of ema_start_iters, ema_iters and ema_beta (or none of them)")
    if cfg.pixel_weights is not None and cfg.cached_conditions:
        raise ConfigError("pixel_weights needs the images, which cached_conditions batches do not carry: remove "
                          "pixel_weights or set cached_conditions: false")
    if cfg.lora.train_tokens and cfg.cached_conditions:
        raise ConfigError(f"train_tokens={_shown(cfg.lora.train_tokens)!r} trains the text encoder's new token rows, "
                          "which cached_conditions (text embeddings computed ahead) leaves out of the step: remove "
                          "train_tokens or set cached_conditions: false")
    prompts = cfg.sample_prompts
    if prompts is not None and (not isinstance(prompts, (list, tuple)) or not prompts
                                or not all(isinstance(p, str) for p in prompts)):
        raise ConfigError(f"sample_prompts={_shown(prompts)!r}: use a non-empty list of strings (or null)")
