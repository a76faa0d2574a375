"""One sampling request, typed and checked before any model loads: what ``sample/generate.py`` parses
from its command line and what the web app builds from its page, run by the same code.

A :class:`SamplingRequest` holds what a user asked for; :meth:`SamplingRequest.check` reads the input
image and fills in the sizes (a :class:`CheckedRequest`), failing with a message that names the
command-line flag of the wrong value (``--prior-steps``, ``--seed``...), so the page and the command
line say the same thing. After the pipeline is built, :meth:`CheckedRequest.settings` applies the
stage changes to that pipeline's own defaults (its weights' ``sampling.json``, else the official
settings), and :meth:`CheckedRequest.run` samples.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from cascade_jax.diffusion import SamplerSettings
from cascade_jax.pipelines import arguments as checks
from cascade_jax.pipelines.defaults import DECODER_DEFAULTS, PRIOR_DEFAULTS
from cascade_jax.pipelines.images import ALPHA_BACKGROUND, load_image, round_size
from cascade_jax.pipelines.lora import check_lora_files
from cascade_jax.pipelines.sizes import check_image_size

MODES = ("text2img", "variation", "img2img", "reconstruct")
IMAGE_MODES = ("variation", "img2img", "reconstruct")
BATCH_MODES = ("text2img", "variation")  # the modes that make --num-images images
STAGE_KEYS = ("steps", "cfg", "shift", "t_start", "sampler", "cfg_t_start", "cfg_t_stop")  # what a request may change
OFFICIAL = {"prior": PRIOR_DEFAULTS, "decoder": DECODER_DEFAULTS}
TITLES = {"prior": "Stage C", "decoder": "Stage B"}
METADATA_FIELDS = ("steps", "cfg", "shift", "sampler", "t_start", "cfg_t_start", "cfg_t_stop", "cfg_rho",
                   "cfg_std_per_sample")


def _flag(name: str, message: str, changes: dict) -> str:
    """A stage setting's message with its command-line flag: "t_start must be ..." -> "--prior-t-start must
    be ..."; a message that does not start with the setting's name gets it in front ("--prior-sampler: ...")."""
    for key in STAGE_KEYS:
        if message.startswith(f"{key} "):
            return f"--{name}-{key.replace('_', '-')}{message[len(key):]}"
    bad = [key for key in changes if key in STAGE_KEYS and not _valid(name, key, changes[key])]
    return f"--{name}-{bad[0].replace('_', '-')}: {message}" if bad else f"--{name}-*: {message}"


def _valid(name: str, key: str, value) -> bool:
    try:
        OFFICIAL[name].replace(**{key: value})
    except (ValueError, TypeError):
        return False
    return True


def stage_changes(name: str, changes) -> dict:
    """``changes`` (a dict of SamplerSettings fields, cfg None = no guidance) checked against the official
    settings of stage ``name`` ("prior" or "decoder"); an impossible value fails naming its flag."""
    changes = dict(changes or {})
    unknown = sorted(set(changes) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"unknown {name} setting(s) {unknown}; a request may change {', '.join(STAGE_KEYS)}")
    try:
        OFFICIAL[name].replace(**changes)
    except (ValueError, TypeError) as e:
        raise ValueError(_flag(name, str(e), changes)) from None
    return changes


class StageSettings(NamedTuple):
    prior: SamplerSettings
    decoder: SamplerSettings


@dataclasses.dataclass(frozen=True)
class SamplingRequest:
    """What to sample. ``height``/``width`` None: ``default_size`` for text2img and variation, the input
    image's size (rounded down to a multiple of 8) otherwise. ``prior``/``decoder``: changes to the
    pipeline's default SamplerSettings (keys of ``STAGE_KEYS``; cfg None = no guidance). ``loras``:
    Stage C LoRA files as ``FILE[:STRENGTH]``."""

    mode: str
    prompt: str = ""
    negative_prompt: str | None = None
    long_prompts: bool = False
    image: str | None = None
    background: tuple = ALPHA_BACKGROUND
    strength: float = 0.8
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    seed: int = 0
    prior: dict = dataclasses.field(default_factory=dict)
    decoder: dict = dataclasses.field(default_factory=dict)
    loras: tuple = ()

    @property
    def count(self) -> int:
        """Images this request makes (img2img and reconstruct: one, of the one input image)."""
        return self.num_images if self.mode in BATCH_MODES else 1

    def check(self, default_size: tuple[int, int] = (1024, 1024)) -> "CheckedRequest":
        """Everything that can be checked without a model, in a second; ValueError names the flag."""
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode in IMAGE_MODES and not self.image:
            raise ValueError(f"{self.mode} needs --image")
        if self.mode == "img2img":
            try:
                checks.check_strength(self.strength)
            except ValueError as e:
                raise ValueError(f"--{e}") from None
        if not checks.is_int(self.num_images) or self.num_images < 1:
            raise ValueError(f"--num-images must be at least 1, got {self.num_images}")
        try:
            seeds = checks.seeds_for(self.seed, self.count)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        prior, decoder = stage_changes("prior", self.prior), stage_changes("decoder", self.decoder)
        try:
            check_lora_files(self.loras)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(str(e) if str(e).startswith("--lora") else f"--lora: {e}") from None
        image = load_image(self.image, self.background) if self.mode in IMAGE_MODES else None
        height, width = (default_size if self.mode in BATCH_MODES
                         else tuple(round_size(side) for side in image.shape[:2]))
        height = height if self.height is None else self.height
        width = width if self.width is None else self.width
        check_image_size(height, width)
        done = dataclasses.replace(self, height=height, width=width, prior=prior, decoder=decoder,
                                   loras=tuple(self.loras))
        return CheckedRequest(done, tuple(seeds), image)


@dataclasses.dataclass(frozen=True)
class CheckedRequest:
    """A checked request: its sizes known, one seed per image, the input image decoded (or None)."""

    request: SamplingRequest
    seeds: tuple
    image: np.ndarray | None

    def official_settings(self) -> StageSettings:
        """The stage changes applied to the official settings (what ``--plan`` compiles for)."""
        return StageSettings(*(OFFICIAL[name].replace(**getattr(self.request, name)) for name in OFFICIAL))

    def settings(self, pipe) -> StageSettings:
        """The stage changes applied to ``pipe``'s defaults (its weights' sampling.json, else the official)."""
        out = []
        for name, base in (("prior", pipe.prior_defaults), ("decoder", pipe.decoder_defaults)):
            try:
                out.append(base.replace(**getattr(self.request, name)))
            except ValueError as e:  # a change that only conflicts with these weights' defaults
                raise ValueError(f"{_flag(name, str(e), getattr(self.request, name))} (with these weights' {name} "
                                 "defaults)") from None
        return StageSettings(*out)

    def describe(self, settings: StageSettings) -> str:
        """The stages this request runs and their settings, for a start-up line."""
        names = ["decoder"] if self.request.mode == "reconstruct" else ["prior", "decoder"]
        return "; ".join(describe(getattr(settings, name), TITLES[name]) for name in names)

    def run(self, pipe, settings: StageSettings, *, callback=None, callback_x0: bool = False):
        """Sample this request with ``pipe`` (a CascadeOutput); ``callback(StepEvent)`` after every step."""
        r = self.request
        common = dict(seed=r.seed, callback=callback, callback_x0=callback_x0, height=r.height, width=r.width)
        text = dict(long_prompts=r.long_prompts)
        if r.mode == "text2img":
            return pipe.text_to_image(r.prompt, r.negative_prompt, num_images_per_prompt=r.num_images,
                                      prior=settings.prior, decoder=settings.decoder, **text, **common)
        if r.mode == "variation":
            return pipe.image_variation(self.image, prompt=r.prompt, num_images_per_prompt=r.num_images,
                                        prior=settings.prior, decoder=settings.decoder, **text, **common)
        if r.mode == "img2img":
            return pipe.image_to_image(self.image, r.prompt, r.negative_prompt, strength=r.strength,
                                       prior=settings.prior, decoder=settings.decoder, **text, **common)
        return pipe.reconstruct(self.image, prompt=r.prompt, decoder=settings.decoder, **common)

    def metadata(self, settings: StageSettings, *, weights: str, dtype: str = "") -> dict:
        """What each result PNG carries (with its seed, added when it is saved)."""
        r = self.request
        stage = lambda s: {k: v for k, v in dataclasses.asdict(s).items() if k in METADATA_FIELDS}
        meta = {"mode": r.mode, "prompt": r.prompt, "negative_prompt": r.negative_prompt or "",
                "prior": stage(settings.prior), "decoder": stage(settings.decoder), "height": r.height,
                "width": r.width, "weights": weights, "dtype": dtype, "long_prompts": r.long_prompts,
                "loras": list(r.loras)}
        return {**meta, "strength": r.strength} if r.mode == "img2img" else meta


def describe(settings: SamplerSettings, title: str) -> str:
    text = f"{title}: {settings.steps} steps, cfg {settings.cfg}, shift {settings.shift}, {settings.sampler}"
    return text + (f", t_start {settings.t_start}" if settings.t_start != 1.0 else "")
