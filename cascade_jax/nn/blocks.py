"""The building blocks shared by Stage B and Stage C (official ``modules/common.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.nn.attention import MultiheadAttention
from cascade_jax.nn.functional import layer_norm
from cascade_jax.nn.layers import GELU, Conv2d, GlobalResponseNorm, LayerNorm2d, Linear, Sequential, SiLU


class Dropout(nnx.Module):
    """``torch.nn.Dropout`` with the key passed at call time, so a model holds no RNG state.

    Off (``deterministic``) unless the model is put in training mode with ``model.train()``
    (``model.eval()`` turns it off again); a fresh model is in inference mode, unlike torch.
    """

    def __init__(self, rate: float = 0.0):
        self.rate = float(rate)
        self.deterministic = True

    def active(self) -> bool:
        return not self.deterministic and self.rate > 0

    def __call__(self, x, key=None):
        if not self.active():
            return x
        if key is None:
            raise ValueError(f"dropout {self.rate} is on (training mode) but no key was given: pass rngs= to the "
                             "model call, or call model.eval() for inference")
        keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def _channel_mlp(c_in, c, dropout, *, rngs):
    # Index 3 is the official Dropout (no parameters, so the checkpoint keys are unchanged).
    return Sequential(Linear(c_in, c * 4, rngs=rngs), GELU(), GlobalResponseNorm(c * 4, rngs=rngs),
                      Dropout(dropout), Linear(c * 4, c, rngs=rngs))


def _run_channel_mlp(mlp: Sequential, x, key):
    for i in range(len(mlp)):
        layer = mlp[i]
        x = layer(x, key) if isinstance(layer, Dropout) else layer(x)
    return x


class ResBlock(nnx.Module):
    """Depthwise conv → LayerNorm → (concat skip) → channel MLP with GRN, plus residual."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0, *, rngs):
        self.depthwise = Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c, rngs=rngs)
        self.norm = LayerNorm2d(eps=1e-6)
        self.channelwise = _channel_mlp(c + c_skip, c, dropout, rngs=rngs)

    def __call__(self, x, x_skip=None, key=None):
        h = self.norm(self.depthwise(x))
        if x_skip is not None:
            h = jnp.concatenate([h, x_skip.astype(h.dtype)], axis=-1)
        return _run_channel_mlp(self.channelwise, h, key) + x

    def official_child_order(self) -> tuple:
        """The official module's registration order of its children (NNX sorts attributes by name)."""
        return ("depthwise", "norm", "channelwise")


class FeedForwardBlock(nnx.Module):
    def __init__(self, c, dropout=0.0, *, rngs):
        self.norm = LayerNorm2d(eps=1e-6)
        self.channelwise = _channel_mlp(c, c, dropout, rngs=rngs)

    def __call__(self, x, key=None):
        return x + _run_channel_mlp(self.channelwise, self.norm(x), key)


class Attention2D(nnx.Module):
    def __init__(self, c, nhead, dropout=0.0, *, rngs):
        self.attn = MultiheadAttention(c, nhead, dropout=dropout, rngs=rngs)

    def __call__(self, x, kv, self_attn=False, key=None):
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if self_attn:
            kv = jnp.concatenate([tokens, kv.astype(tokens.dtype)], axis=1)
        return self.attn(tokens, kv, key=key).reshape(b, h, w, c)


class AttnBlock(nnx.Module):
    """Self+cross attention: queries are pixels, keys/values are pixels and the mapped condition."""

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0, *, rngs):
        self.self_attn = self_attn
        self.norm = LayerNorm2d(eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout, rngs=rngs)
        self.kv_mapper = Sequential(SiLU(), Linear(c_cond, c, rngs=rngs))

    def __call__(self, x, kv, key=None):
        kv = self.kv_mapper(kv)
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn, key=key)


class TimestepBlock(nnx.Module):
    """FiLM from the noise-level embedding and each extra condition (``sca``, ``crp``)."""

    def __init__(self, c, c_timestep, conds=("sca",), *, rngs):
        self.conds = tuple(conds)
        self.c_timestep = c_timestep
        self.mapper = Linear(c_timestep, c * 2, rngs=rngs)
        for name in self.conds:
            setattr(self, f"mapper_{name}", Linear(c_timestep, c * 2, rngs=rngs))

    def __call__(self, x, t):
        chunks = jnp.split(t, len(self.conds) + 1, axis=1)
        # FiLM in float32: a is small, and in bfloat16 1 + a keeps only ~2 significant digits of it.
        ab = self.mapper(chunks[0]).astype(jnp.float32)
        for i, name in enumerate(self.conds):
            ab = ab + getattr(self, f"mapper_{name}")(chunks[i + 1]).astype(jnp.float32)
        a, b = jnp.split(ab[:, None, None, :], 2, axis=-1)
        return (x.astype(jnp.float32) * (1 + a) + b).astype(x.dtype)

    def official_child_order(self) -> tuple:
        """The official registration order: ``mapper``, then one mapper per condition in order."""
        return ("mapper",) + tuple(f"mapper_{c}" for c in self.conds)


def r_embedding(r, c_r: int, max_positions: float = 10000.0):
    """Sinusoidal embedding of the noise level r in [0, 1], always computed in float32.

    (diffusers casts r to bf16 first, which rounds r·10000 badly; we never do.)
    """
    r = r.astype(jnp.float32) * max_positions
    half = c_r // 2
    # The frequency table is a constant computed in numpy, not with jnp.exp: r·10000·freq reaches
    # 10^4 rad, so one ulp of freq moves the embedding by ~1e-3, and XLA's exp differs by an ulp
    # between eager, jit and backends. float32 product then exp in float64 reproduces torch's table.
    exponent = np.arange(half, dtype=np.float32) * np.float32(-np.log(max_positions) / (half - 1))
    freq = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    emb = r[:, None] * freq[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if c_r % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def clip_norm(x):
    return layer_norm(x, eps=1e-6)
