"""ControlNet training task (official ``train/train_c_controlnet.py``), ``stage: c_controlnet``.

The Stage C task's conditioning (5% empty captions, CLIP-L image embeddings for 10%), with a
hint made from each training image by the configured ``controlnet_filter``; the ControlNet's
residuals go into Stage C, whose noise prediction gives the P2-weighted loss (official; offset
noise as ``offset_noise`` says: 0.1 for inpainting and super-resolution).

Done better than the official script: Stage C is frozen — no gradient, no optimizer state (the
official script leaves ``requires_grad`` on, so its gradients are computed, then not stepped) —
and in eval mode (the official one trains through Stage C with its dropout on). Only the
ControlNet's parameters train (its BatchNorm statistics stay fixed: the official code keeps the
EfficientNet backbone in eval mode). The exported "generator" is the ControlNet.

Filters per hint: ``CannyFilter`` and ``InpaintFilter`` run on the host (OpenCV, numpy);
inpainting masks come from the official saliency net when ``controlnet_filter_params.saliency``
names its weights (this project's key: the official code loads a fixed path; threshold drawn in
``thresold``, outpainting with ``p_outpaint``), else from random shapes (``random_shape_masks``);
``SREffnetFilter`` runs inside the step (EfficientNet latents of the 2×
nearest-downscaled image, nearest-upsampled back). ``IdentityFilter`` needs face boxes and ArcFace
embeddings per image, which no loader here provides: it is refused with that message.

Initialisation without ``controlnet_checkpoint_path``: the official init (random layers, zero
output projections); an ``effnet`` backbone starts from the frozen EfficientNet encoder's
backbone (the official code uses torchvision's ImageNet weights, which cannot be downloaded
here; the encoder's backbone is the same architecture), its stem adapted to ``c_in`` channels.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.data import hints
from cascade_jax.models.controlnet import adapt_stem_weight
from cascade_jax.models.random_init import random_model
from cascade_jax.models.registry import abstract_model
from cascade_jax.nn.params import named_variables
from cascade_jax.training import losses
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.run_checks import check_controlnet_filter, check_init
from cascade_jax.training.stage_c import StageCTask
from cascade_jax.training.task import TrainModules, converted_dir, load_weights, param_dtype, register_task, work_dir

# official filter class -> control (hint) name
FILTERS = {"CannyFilter": "canny", "InpaintFilter": "inpainting", "SREffnetFilter": "super_resolution",
           "IdentityFilter": "identity"}


def control_of(cfg: TrainConfig) -> str:
    check_controlnet_filter(cfg)  # a filter that can train (validation.py checked the name at load)
    return FILTERS[cfg.controlnet.controlnet_filter]


def controlnet_config(cfg: TrainConfig, stage_c_config: dict) -> dict:
    """The official ``ControlNet(c_in=filter channels, proj_blocks=controlnet_blocks, bottleneck_mode)``;
    c_proj is the width of the Stage C of ``stage_c_config`` (the official default 2048 is the 3.6B width)."""
    if not cfg.controlnet.controlnet_blocks:
        raise ValueError("controlnet_blocks is required: the Stage C ResBlock indices that get a residual")
    width = stage_c_config["c_hidden"][0]  # the width its embedding projects to, where residuals are added
    return {"c_in": hints.HINT_CHANNELS[control_of(cfg)], "c_proj": int(width),
            "proj_blocks": [int(i) for i in cfg.controlnet.controlnet_blocks],
            "bottleneck_mode": cfg.controlnet.controlnet_bottleneck_mode or "effnet"}


def init_controlnet(config: dict, effnet, seed: int, dtype: str):
    """Random layers (fast numpy init), zero output projections, effnet backbone from ``effnet``'s."""
    model = random_model("controlnet", config, seed=seed, dtype=dtype)
    for projection in model.projections:
        projection[2].weight.set_value(jnp.zeros_like(projection[2].weight[...]))
    if config["bottleneck_mode"] == "effnet":
        source = named_variables(effnet.backbone)
        for key, var in named_variables(model.backbone).items():
            value = np.asarray(source[key][...], np.float32)
            if key == "0.0.weight":
                value = adapt_stem_weight(value, config["c_in"])
            var.set_value(jnp.asarray(value, var.dtype))
    return model


class ControlNetTask(StageCTask):
    generator_model = "controlnet"
    # generator_checkpoint_path is the frozen Stage C here; init: scratch makes it random (tests). The
    # ControlNet itself starts from controlnet_checkpoint_path, else from the official init.
    inits = ("checkpoint", "scratch")

    def checkpoint_model(self, cfg: TrainConfig) -> tuple[str, dict]:
        return "stage_c", self.generator_config(cfg)

    def build(self, cfg: TrainConfig) -> TrainModules:
        work = work_dir(cfg)
        frozen = self.build_frozen(cfg, work)
        stage_c = self.frozen_stage_c(cfg, work)
        config = controlnet_config(cfg, self.generator_config(cfg))
        if cfg.controlnet.controlnet_checkpoint_path is not None:
            controlnet = load_weights("controlnet", config, cfg.controlnet.controlnet_checkpoint_path, work, cfg.param_dtype)
        else:
            controlnet = init_controlnet(config, frozen["effnet"], cfg.seed, cfg.param_dtype)
        modules = TrainModules(generator=controlnet, stage_c=stage_c, **frozen)
        self.tokenizer = self.tokenizer_for(cfg)
        self.clip_image_size = modules.image_encoder.vision_model.embeddings.image_size
        return modules

    def abstract_modules(self, cfg: TrainConfig) -> TrainModules:
        """As ``build``, shapes only: the ControlNet (trained) beside the frozen Stage C (eval mode, remat)."""
        stage_c = abstract_model("stage_c", self.generator_config(cfg))
        if cfg.remat:
            stage_c.set_remat(cfg.remat)
        config = controlnet_config(cfg, self.generator_config(cfg))
        frozen = {name: abstract_model(*spec) for name, spec in self.frozen_specs(cfg).items()}
        return TrainModules(generator=abstract_model("controlnet", config), stage_c=stage_c, **frozen)

    def plan_batch(self, cfg: TrainConfig) -> dict:
        specs = super().plan_batch(cfg)
        if control_of(cfg) in ("canny", "inpainting"):  # made on the host; super-resolution's inside the step
            b, s = cfg.batch_size, cfg.image_size
            specs["hint"] = ((b, s, s, hints.HINT_CHANNELS[control_of(cfg)]), np.float32)
        return specs

    def frozen_stage_c(self, cfg: TrainConfig, work: Path):
        """Stage C from ``generator_checkpoint_path`` (random with ``init: scratch``, for tests), in eval mode."""
        config = self.generator_config(cfg)
        if cfg.init == "scratch":
            model = random_model("stage_c", config, seed=cfg.seed + 50, dtype=cfg.param_dtype)
        else:
            check_init(cfg, self)  # ControlNet training needs the trained Stage C
            model = load_weights("stage_c", config, cfg.generator_checkpoint_path, work, cfg.param_dtype)
        model.eval()  # no dropout: Stage C is a fixed function here
        if cfg.remat:  # the gradient to the ControlNet still runs backwards through Stage C
            model.set_remat(cfg.remat)
        return model

    def export_model(self, cfg: TrainConfig) -> tuple[str, dict]:
        return "controlnet", controlnet_config(cfg, self.generator_config(cfg))

    def frozen_sources(self, cfg: TrainConfig, work_dir: Path) -> dict:
        """The Stage C task's, plus the frozen Stage C's converted directory (exported beside the ControlNet)."""
        sources = super().frozen_sources(cfg, work_dir)
        if cfg.init != "scratch" and cfg.generator_checkpoint_path is not None:
            sources["stage_c"] = converted_dir("stage_c", self.generator_config(cfg), cfg.generator_checkpoint_path,
                                               work_dir)
        return sources

    def unsourced_spec(self, cfg: TrainConfig, attr: str) -> tuple[str, dict]:
        if attr == "stage_c":  # init: scratch, random weights (tests)
            return "stage_c", self.generator_config(cfg)
        return super().unsourced_spec(cfg, attr)

    def host_batch(self, cfg: TrainConfig, batch: dict, rng: np.random.Generator) -> dict:
        arrays = super().host_batch(cfg, batch, rng)
        params = dict(cfg.controlnet.controlnet_filter_params or {})
        images, control = arrays["images"], control_of(cfg)
        if control == "canny":
            arrays["hint"] = hints.canny_hint(images, resize=params.get("resize", 224))
        elif control == "inpainting":
            arrays["hint"] = hints.inpainting_hint(images, self.inpainting_masks(rng, images, params))
        return arrays

    def inpainting_masks(self, rng: np.random.Generator, images: np.ndarray, params: dict) -> np.ndarray:
        if not params.get("saliency"):
            return random_shape_masks(rng, images, params)
        if getattr(self, "saliency_fn", None) is None:
            from cascade_jax.pipelines.controlnet import saliency_function
            self.saliency_fn = saliency_function(params["saliency"])
        low, high = params.get("thresold", hints.inpainting.THRESHOLD_RANGE)  # (sic: the official key)
        # As the official filter: one threshold and one outpainting draw per batch.
        outpaint = bool(rng.random() < params.get("p_outpaint", hints.inpainting.P_OUTPAINT))
        return hints.saliency_mask(images, self.saliency_fn, threshold=rng.uniform(low, high), outpaint=outpaint)

    def hint(self, modules, batch, cfg: TrainConfig):
        if control_of(cfg) != "super_resolution":
            return batch["hint"]
        # SREffnetFilter: EfficientNet latents of the nearest-downscaled image, nearest-upsampled back.
        factor = dict(cfg.controlnet.controlnet_filter_params or {}).get("scale_factor", hints.super_resolution.SCALE_FACTOR)
        images = losses.images_to_unit(batch["images"])
        low = losses.resize_nearest(images, (int(images.shape[1] * factor), int(images.shape[2] * factor)))
        latents = modules.effnet(losses.effnet_normalize(low).astype(param_dtype(modules.effnet)))
        up = (int(latents.shape[1] / factor), int(latents.shape[2] / factor))
        return jax.lax.stop_gradient(losses.resize_nearest(latents.astype(jnp.float32), up))

    def loss(self, modules, batch, key, loss_state, cfg: TrainConfig):
        x0, clip_text, pooled, clip_img = self.conditions(modules, batch)
        key_noise, key_offset = jax.random.split(key)
        t, epsilon = losses.draw_t_and_noise(key_noise, x0.shape)
        if cfg.controlnet.offset_noise:  # official GDF offset noise: one N(0, 1) per (sample, channel), scaled
            epsilon = epsilon + cfg.controlnet.offset_noise * jax.random.normal(key_offset, (x0.shape[0], 1, 1, x0.shape[-1]))
        cnet = modules.generator(self.hint(modules, batch, cfg).astype(param_dtype(modules.generator)))
        stage_c, dtype = modules.stage_c, param_dtype(modules.stage_c)
        cnet = [None if c is None else c.astype(dtype) for c in cnet]

        def apply(noised, noise_cond):
            return stage_c(noised.astype(dtype), noise_cond, clip_text.astype(dtype), pooled.astype(dtype),
                           clip_img.astype(dtype), cnet=cnet)

        return losses.denoising_loss(apply, x0, t, epsilon, losses.make_gdf(cfg.adaptive_loss_weight), loss_state)


def random_shape_masks(rng: np.random.Generator, images: np.ndarray, params: dict) -> np.ndarray:
    """Training masks (the official saliency net is unavailable), outpainting-inverted with ``p_outpaint``;
    the blur kernel shrinks with small images so a mask is not blurred away."""
    batch, height, width = images.shape[:3]
    kernel = min(hints.inpainting.BLUR_KERNEL, (min(height, width) // 4) * 2 + 1)
    return hints.random_shape_masks(rng, batch, height, width, p_outpaint=params.get("p_outpaint", 0.4),
                                    kernel=kernel)


register_task("c_controlnet", ControlNetTask)
