"""Stage C: the text-conditional prior (official ``modules/stage_c.py``), NHWC.

Defaults are the released 3.6B model; the 1B "lite" model is ``configs/models/stage_c_lite.yaml``.
"""

from __future__ import annotations

from functools import partial

from flax import nnx

from cascade_jax.models.config_forms import FLAG, INT, per_level
from cascade_jax.models.unet import UNET_CONFIG_FORMS, CascadeUNet, dropout_key, embed_condition_tokens, map_to_tokens
from cascade_jax.nn.functional import resize_bilinear_align_corners
from cascade_jax.nn.layers import Conv2d, Identity, LayerNorm2d, Lambda, Linear, Sequential


def _rescale(x, factor: float):
    # nn.Upsample(scale_factor, align_corners=True): output floor(size·factor), corner-aligned grid.
    _, h, w, _ = x.shape
    return resize_bilinear_align_corners(x, (int(h * factor), int(w * factor)))


class UpDownBlock2d(nnx.Module):
    """1x1 channel mapping plus an optional 2x bilinear rescale (official keys ``blocks.0`` / ``blocks.1``).

    With ``enabled=False`` (every released Stage C) the rescale is the identity but keeps its index,
    so the mapping stays at ``blocks.0`` going down and ``blocks.1`` going up, as in the checkpoints.
    """

    def __init__(self, c_in, c_out, mode, enabled=True, *, rngs):
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}")
        factor = 2.0 if mode == "up" else 0.5
        interpolation = Lambda(partial(_rescale, factor=factor), f"Upsample({factor})") if enabled else Identity()
        mapping = Conv2d(c_in, c_out, 1, rngs=rngs)
        self.blocks = nnx.List([interpolation, mapping] if mode == "up" else [mapping, interpolation])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class StageC(CascadeUNet):
    # switch_level is read at level - 1 (the first level has no rescale): one entry fewer than c_hidden.
    CONFIG_FORMS = {**UNET_CONFIG_FORMS, "c_clip_text": INT, "c_clip_text_pooled": INT, "c_clip_img": INT,
                    "switch_level": per_level(FLAG, level_offset=-1)}
    CONDITION_MAPPERS = ("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper")

    def __init__(self, c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=2048, c_hidden=(2048, 2048), nhead=(32, 32),
                 blocks=((8, 24), (24, 8)), block_repeat=((1, 1), (1, 1)), level_config=("CTA", "CTA"),
                 c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
                 dropout=(0.1, 0.1), self_attn=True, t_conds=("sca", "crp"), switch_level=(False,), remat=None, *,
                 rngs: nnx.Rngs):
        self.c_clip_seq = c_clip_seq
        self.clip_txt_mapper = Linear(c_clip_text, c_cond, rngs=rngs)
        self.clip_txt_pooled_mapper = Linear(c_clip_text_pooled, c_cond * c_clip_seq, rngs=rngs)
        self.clip_img_mapper = Linear(c_clip_img, c_cond * c_clip_seq, rngs=rngs)
        self._init_io(c_in, c_out, c_hidden[0], patch_size, rngs=rngs)

        def downscaler(c_from, c_to, level):
            return Sequential(LayerNorm2d(eps=1e-6),
                              UpDownBlock2d(c_from, c_to, "down", enabled=switch_level[level], rngs=rngs))

        def upscaler(c_from, c_to, level):
            return Sequential(LayerNorm2d(eps=1e-6),
                              UpDownBlock2d(c_from, c_to, "up", enabled=switch_level[level], rngs=rngs))

        self._init_levels(c_hidden=c_hidden, nhead=nhead, blocks=blocks, block_repeat=block_repeat,
                          level_config=level_config, c_cond=c_cond, c_r=c_r, t_conds=t_conds,
                          kernel_size=kernel_size, dropout=dropout, self_attn=self_attn,
                          make_downscaler=downscaler, make_upscaler=upscaler, rngs=rngs)
        self.set_remat(remat)

    def gen_c_embeddings(self, clip_text, clip_text_pooled, clip_img):
        """Condition tokens: text sequence, then c_clip_seq tokens per pooled-text and image embedding."""
        return embed_condition_tokens(self.clip_txt_mapper(clip_text),
                                      map_to_tokens(self.clip_txt_pooled_mapper, clip_text_pooled, self.c_clip_seq),
                                      map_to_tokens(self.clip_img_mapper, clip_img, self.c_clip_seq))

    def __call__(self, x, r, clip_text, clip_text_pooled, clip_img, cnet=None, rngs=None, **t_conds):
        """NHWC latent ``x`` (B, H, W, c_in), noise level ``r`` (B,) → (B, H, W, c_out).

        ``clip_text`` (B, S, c_clip_text); ``clip_text_pooled`` / ``clip_img`` (B, D) or (B, S, D);
        ``t_conds`` by name (``sca=``, ``crp=``), zeros where omitted. ``cnet``: ControlNet residuals,
        one per ResBlock in visiting order (None adds nothing), resized to the block's input.
        ``rngs``: dropout randomness (``nnx.Rngs`` or a key), needed only in training mode.
        """
        r_embed = self._embed_noise_levels(r, t_conds, x.shape[0])
        clip = self.gen_c_embeddings(clip_text, clip_text_pooled, clip_img)
        return self._run_unet(self.embedding(x), r_embed, clip, cnet, key=dropout_key(rngs))
