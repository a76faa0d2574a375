"""diffusers' Stable Cascade denoising loops without the text encoders (the PyTorch side of the
GPU benchmark): ``StableCascadePriorPipeline`` / ``StableCascadeDecoderPipeline`` 0.42.1 steps
8-9 verbatim in effect - ``DDPMWuerstchenScheduler``, CFG by batch concatenation and
``torch.lerp`` - fed random conditioning of the released shapes. The decoder runs with
guidance 1.1 (the official setting; diffusers' default 0 would skip the unconditional half),
so both frameworks do the same network work.
"""

from __future__ import annotations

import torch


def denoise(unet, latents, steps: int, cfg: float, cond: dict, uncond: dict):
    """Run ``steps`` DDPM-Wuerstchen steps with CFG; ``cond``/``uncond``: the unet's keyword inputs."""
    from diffusers.schedulers import DDPMWuerstchenScheduler

    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(steps, device=latents.device)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    with torch.inference_mode():
        for t in scheduler.timesteps[:-1]:
            ratio = t.expand(latents.size(0)).to(latents.dtype)
            pred = unet(torch.cat([latents] * 2), torch.cat([ratio] * 2), return_dict=False, **both)[0]
            text, uncond_pred = pred.chunk(2)
            pred = torch.lerp(uncond_pred, text, cfg)
            latents = scheduler.step(model_output=pred, timestep=ratio, sample=latents).prev_sample
    return latents


def prior_conditions(batch: int, config: dict, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    draw = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    cond = {"clip_text_pooled": draw(batch, 1, config["c_clip_text_pooled"]),
            "clip_text": draw(batch, 77, config["c_clip_text"]), "clip_img": draw(batch, 1, config["c_clip_img"])}
    uncond = {"clip_text_pooled": draw(batch, 1, config["c_clip_text_pooled"]),
              "clip_text": draw(batch, 77, config["c_clip_text"]),
              "clip_img": torch.zeros(batch, 1, config["c_clip_img"], device=device, dtype=dtype)}
    return cond, uncond


def decoder_conditions(effnet, config: dict, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    batch, dtype, device = effnet.shape[0], effnet.dtype, effnet.device
    draw = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    return ({"clip_text_pooled": draw(batch, 1, config["c_clip"]), "effnet": effnet},
            {"clip_text_pooled": draw(batch, 1, config["c_clip"]), "effnet": torch.zeros_like(effnet)})


def decode(vq, latents, scale_factor: float):
    with torch.inference_mode():
        return vq.decode(latents * scale_factor).sample.clamp(0, 1)
