"""One ControlNet sampling request, typed and checked before any model is built: what
``sample/controlnet.py`` parses from its command line and what the web app's ControlNet tab builds,
with one set of defaults (the official ones) and one set of checks.

The control image (and mask) is a file, or pixels the caller already holds (``image_array``,
``mask_array``: the app's uploads); nothing is decoded by :meth:`ControlNetRequest.check`, which
reads an image's size from its header (refusing decompression bombs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cascade_jax.pipelines.controlnet import ControlSettings, controlled_steps, output_size, saliency_function
from cascade_jax.pipelines.defaults import DECODER_DEFAULTS, PRIOR_DEFAULTS
from cascade_jax.pipelines.images import image_size, load_grey, load_image, local_file
from cascade_jax.pipelines.request import StageSettings

OFFICIAL_CFG = 4.0  # Stage C guidance with a control; super-resolution runs without (the official notebook)


@dataclasses.dataclass(frozen=True)
class ControlInputs:
    """The decoded inputs of a request: the control image, the mask (or None), the faces (or None)."""

    image: np.ndarray
    mask: np.ndarray | None
    faces: tuple | None


@dataclasses.dataclass(frozen=True, eq=False)
class ControlNetRequest:
    """What to sample with a ControlNet of kind ``control`` (see ``pipelines.controlnet.CONTROLS``).
    ``prior_cfg`` None: the control's official guidance (4, none for super_resolution); 1 also means none."""

    control: str
    image: str | None = None
    image_array: np.ndarray | None = None
    mask: str | None = None
    mask_array: np.ndarray | None = None
    saliency: str | None = None
    mask_threshold: float = 0.2
    outpaint: bool = False
    faces: str | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    strength: float = 1.0
    control_start: int = 0
    control_stop: int | None = None
    t_start: float = 1.0
    keep_unmasked: bool = True
    prior_steps: int = PRIOR_DEFAULTS.steps
    prior_cfg: float | None = None
    decoder_steps: int = DECODER_DEFAULTS.steps

    @property
    def control_settings(self) -> ControlSettings:
        return ControlSettings(self.strength, self.control_start, self.control_stop)

    def check(self) -> tuple[int, int]:
        """Everything that can be checked before a model is built; returns the output (height, width)."""
        has_mask = self.mask or self.mask_array is not None
        if self.control == "inpainting" and not (has_mask or self.saliency):
            raise ValueError("inpainting needs --mask, or --saliency with the official saliency net for automatic "
                             "masks (its weights are not included)")
        if self.control == "identity" and not self.faces:
            raise ValueError("identity needs --faces (boxes and ArcFace embeddings; face detection is not included)")
        if not 0 < self.t_start <= 1:
            raise ValueError(f"--t-start must be in (0, 1], got {self.t_start}")
        if self.prior_steps < 1 or self.decoder_steps < 1:
            raise ValueError("--prior-steps and --decoder-steps must be at least 1")
        # (--strength, --control-start, --control-stop: the messages name them as "control strength/start/stop")
        self.control_settings.check(controlled_steps(self.control, self.prior_steps, self.t_start))
        for name in ("image", "mask", "faces"):  # (--saliency may also be a converted directory: checked at load)
            path = getattr(self, name)
            if path:
                local_file(path, f"--{name} {path}")  # a local file or an object in a bucket (copied once)
        if self.image_array is None and not self.image:
            raise ValueError("a ControlNet request needs a control image (--image)")
        image_hw = self.image_array.shape[:2] if self.image_array is not None else image_size(self.image)
        return output_size(self.control, tuple(image_hw), self.height, self.width)

    def settings(self) -> StageSettings:
        """Stage C / Stage B settings: the official ones with these steps and the control's guidance."""
        cfg = self.prior_cfg if self.prior_cfg is not None else (
            None if self.control == "super_resolution" else OFFICIAL_CFG)
        return StageSettings(PRIOR_DEFAULTS.replace(steps=self.prior_steps, cfg=None if cfg == 1 else cfg),
                             DECODER_DEFAULTS.replace(steps=self.decoder_steps))

    def load_inputs(self) -> ControlInputs:
        """The pixels (decoded now unless given) and the faces; a corrupt file fails here, before any model."""
        image = self.image_array if self.image_array is not None else load_image(self.image)
        mask = self.mask_array if self.mask_array is not None else (load_grey(self.mask) if self.mask else None)
        return ControlInputs(image, mask, read_faces(self.faces) if self.faces else None)

    def run(self, pipe, inputs: ControlInputs, settings: StageSettings):
        """Sample with ``pipe`` (a ControlNetPipeline of this request's control): a ControlNetOutput."""
        saliency = saliency_function(self.saliency) if self.saliency and inputs.mask is None else None
        return pipe(inputs.image, self.prompt, self.negative_prompt, mask=inputs.mask, faces=inputs.faces,
                    saliency_fn=saliency, mask_threshold=self.mask_threshold, outpaint=self.outpaint,
                    height=self.height, width=self.width, seed=self.seed, control=self.control_settings,
                    prior=settings.prior, decoder=settings.decoder, t_start=self.t_start,
                    keep_unmasked=self.keep_unmasked)

    def metadata(self, settings: StageSettings, *, weights: str, controlnet: str) -> dict:
        """What each result PNG carries (with its seed, added when it is saved)."""
        stage = lambda s: {"steps": s.steps, "cfg": s.cfg, "shift": s.shift}
        return {"mode": f"controlnet:{self.control}", "prompt": self.prompt,
                "negative_prompt": self.negative_prompt or "",
                "control": {"strength": self.strength, "start": self.control_start, "stop": self.control_stop},
                "prior": stage(settings.prior), "decoder": stage(settings.decoder), "weights": weights,
                "controlnet": controlnet}


def read_faces(path):
    """(boxes, embeddings) of an identity request's .npz, as one image's lists."""
    with np.load(local_file(path, f"--faces {path}")) as data:
        if "boxes" not in data or "embeddings" not in data:
            raise ValueError(f"{path} must hold arrays 'boxes' (N, 4) and 'embeddings' (N, 512), has {data.files}")
        return [data["boxes"]], [data["embeddings"]]
