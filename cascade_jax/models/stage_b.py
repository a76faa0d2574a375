"""Stage B: the diffusion decoder from Stage C latents to Stage A latents (official ``modules/stage_b.py``), NHWC.

Defaults are the released 1.5B model; the 700M "lite" model is ``configs/models/stage_b_lite.yaml``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cascade_jax.models.config_forms import INT
from cascade_jax.models.unet import UNET_CONFIG_FORMS, CascadeUNet, dropout_key, embed_condition_tokens, map_to_tokens
from cascade_jax.nn.functional import resize_bilinear_align_corners
from cascade_jax.nn.layers import GELU, Conv2d, ConvTranspose2d, LayerNorm2d, Linear, Sequential

# The official forward substitutes an 8x8 black image when no pixels are given.
_DEFAULT_PIXELS_SIZE = 8


def _conditioning_mapper(c_in, c_hidden0, *, rngs):
    return Sequential(Conv2d(c_in, c_hidden0 * 4, 1, rngs=rngs), GELU(),
                      Conv2d(c_hidden0 * 4, c_hidden0, 1, rngs=rngs), LayerNorm2d(eps=1e-6))


class StageB(CascadeUNet):
    CONFIG_FORMS = {**UNET_CONFIG_FORMS, "c_clip": INT, "c_effnet": INT, "c_pixels": INT}
    CONDITION_MAPPERS = ("effnet_mapper", "pixels_mapper", "clip_mapper")

    def __init__(self, c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=(320, 640, 1280, 1280),
                 nhead=(-1, -1, 20, 20), blocks=((2, 6, 28, 6), (6, 28, 6, 2)),
                 block_repeat=((1, 1, 1, 1), (3, 3, 2, 2)), level_config=("CT", "CT", "CTA", "CTA"), c_clip=1280,
                 c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=(0, 0, 0.1, 0.1), self_attn=True,
                 t_conds=("sca",), remat=None, *, rngs: nnx.Rngs):
        self.c_clip_seq, self.c_pixels = c_clip_seq, c_pixels
        self.effnet_mapper = _conditioning_mapper(c_effnet, c_hidden[0], rngs=rngs)
        self.pixels_mapper = _conditioning_mapper(c_pixels, c_hidden[0], rngs=rngs)
        self.clip_mapper = Linear(c_clip, c_cond * c_clip_seq, rngs=rngs)
        self._init_io(c_in, c_out, c_hidden[0], patch_size, rngs=rngs)

        def downscaler(c_from, c_to, level):
            return Sequential(LayerNorm2d(eps=1e-6), Conv2d(c_from, c_to, 2, stride=2, rngs=rngs))

        def upscaler(c_from, c_to, level):
            return Sequential(LayerNorm2d(eps=1e-6), ConvTranspose2d(c_from, c_to, 2, stride=2, rngs=rngs))

        self._init_levels(c_hidden=c_hidden, nhead=nhead, blocks=blocks, block_repeat=block_repeat,
                          level_config=level_config, c_cond=c_cond, c_r=c_r, t_conds=t_conds,
                          kernel_size=kernel_size, dropout=dropout, self_attn=self_attn,
                          make_downscaler=downscaler, make_upscaler=upscaler, rngs=rngs)
        self.set_remat(remat)

    def gen_c_embeddings(self, clip):
        """c_clip_seq condition tokens per pooled-text embedding ((B, D) or (B, S, D))."""
        return embed_condition_tokens(map_to_tokens(self.clip_mapper, clip, self.c_clip_seq))

    def __call__(self, x, r, effnet, clip, pixels=None, rngs=None, **t_conds):
        """NHWC latent ``x`` (B, H, W, c_in), noise level ``r`` (B,) → (B, H, W, c_out).

        ``effnet`` (B, h, w, c_effnet) Stage C latent / EfficientNet features, any size (resized to
        the embedded grid); ``clip`` pooled text (B, D) or (B, S, D); ``pixels`` (B, h, w, c_pixels),
        black 8x8 when omitted; ``t_conds`` by name (``sca=``), zeros where omitted. ``rngs``: dropout
        randomness (``nnx.Rngs`` or a key), needed only in training mode.
        """
        if pixels is None:
            pixels = jnp.zeros((x.shape[0], _DEFAULT_PIXELS_SIZE, _DEFAULT_PIXELS_SIZE, self.c_pixels), x.dtype)
        r_embed = self._embed_noise_levels(r, t_conds, x.shape[0])
        clip = self.gen_c_embeddings(clip)
        x = self.embedding(x)
        size = x.shape[1:3]
        # Official order: effnet is resized (in float32) before its mapper, pixels after theirs.
        x = x + self.effnet_mapper(resize_bilinear_align_corners(effnet.astype(jnp.float32), size)).astype(x.dtype)
        x = x + resize_bilinear_align_corners(self.pixels_mapper(pixels), size).astype(x.dtype)
        return self._run_unet(x, r_embed, clip, key=dropout_key(rngs))
