"""Multi-head attention with the packed q/k/v parameter of ``torch.nn.MultiheadAttention``."""

from __future__ import annotations

import jax
from flax import nnx

from cascade_jax.nn.layers import Linear
from cascade_jax.nn.params import param


class MultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)``, inference.

    q/k/v stay packed in ``in_proj_weight`` (stored (c, 3c)): the official LoRA adapts the
    packed projection, so splitting it would break LoRA parity.
    """

    def __init__(self, c, nhead, *, rngs):
        if c % nhead:
            raise ValueError(f"attention width {c} is not divisible by nhead={nhead}")
        self.c, self.nhead = c, nhead
        self.in_proj_weight = param(rngs, (c, 3 * c), torch_layout="linear", axes=("in", "qkv"))
        self.in_proj_bias = param(rngs, (3 * c,), torch_layout="same", axes=("qkv",))
        self.out_proj = Linear(c, c, rngs=rngs)

    def __call__(self, q_in, kv_in):
        w, b = self.in_proj_weight[...], self.in_proj_bias[...]
        c, heads = self.c, self.nhead
        q = q_in.astype(w.dtype) @ w[:, :c] + b[:c]
        k = kv_in.astype(w.dtype) @ w[:, c:2 * c] + b[c:2 * c]
        v = kv_in.astype(w.dtype) @ w[:, 2 * c:] + b[2 * c:]
        split = lambda t: t.reshape(*t.shape[:2], heads, c // heads)
        out = jax.nn.dot_product_attention(split(q), split(k), split(v))
        return self.out_proj(out.reshape(*out.shape[:2], c))
