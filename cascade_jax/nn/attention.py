"""Multi-head attention with the packed q/k/v parameter of ``torch.nn.MultiheadAttention``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.nn.layers import Linear
from cascade_jax.nn.params import param


class MultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention(c, nhead, dropout, bias=True, batch_first=True)``.

    q/k/v stay packed in ``in_proj_weight`` (stored (c, 3c)): the official LoRA adapts the
    packed projection, so splitting it would break LoRA parity. ``dropout`` acts on the
    attention weights, as torch's does, only in training mode (``deterministic=False``, set by
    ``model.train()``) and with a ``key``; otherwise the fused ``dot_product_attention`` runs.
    """

    def __init__(self, c, nhead, dropout=0.0, *, rngs):
        if c % nhead:
            raise ValueError(f"attention width {c} is not divisible by nhead={nhead}")
        self.c, self.nhead = c, nhead
        self.dropout = float(dropout)
        self.deterministic = True
        self.in_proj_weight = param(rngs, (c, 3 * c), torch_layout="linear", axes=("in", "qkv"))
        self.in_proj_bias = param(rngs, (3 * c,), torch_layout="same", axes=("qkv",))
        self.out_proj = Linear(c, c, rngs=rngs)

    def __call__(self, q_in, kv_in, key=None):
        w, b = self.in_proj_weight[...], self.in_proj_bias[...]
        c, heads = self.c, self.nhead
        q = q_in.astype(w.dtype) @ w[:, :c] + b[:c]
        k = kv_in.astype(w.dtype) @ w[:, c:2 * c] + b[c:2 * c]
        v = kv_in.astype(w.dtype) @ w[:, 2 * c:] + b[2 * c:]
        split = lambda t: t.reshape(*t.shape[:2], heads, c // heads)
        if self.deterministic or self.dropout == 0:
            out = jax.nn.dot_product_attention(split(q), split(k), split(v))
        else:
            out = _attention_with_dropout(split(q), split(k), split(v), self.dropout, key)
        return self.out_proj(out.reshape(*out.shape[:2], c))


def _attention_with_dropout(q, k, v, rate: float, key):
    """softmax(q·kᵀ/√d) with dropout on the weights, then ·v; (B, S, heads, d) in and out."""
    if key is None:
        raise ValueError(f"attention dropout {rate} is on (training mode) but no key was given: pass rngs= to the "
                         "model call, or call model.eval() for inference")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - rate), 0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
