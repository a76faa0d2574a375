"""Where the time goes: each block type, and the ops inside ResBlock / AttnBlock, at the shapes
they see inside the model, JAX against the matching diffusers sub-module (same weights).

A jitted single block is not exactly what XLA does with the whole fused model, so the
breakdown names *which* op is slower; the whole-model ratio stays the number to quote.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import alternate, summarize

ROUNDS = 3


def level_shapes(model_name: str, config: dict, shape: tuple) -> list[tuple]:
    """(h, w, c) of the feature map at each level for a latent of ``shape`` (h, w, c_in)."""
    p = config["patch_size"]
    h, w = shape[0] // p, shape[1] // p
    out = []
    for i, c in enumerate(config["c_hidden"]):
        halve = i > 0 and (model_name == "stage_b" or bool(config.get("switch_level", [False])[i - 1]))
        if halve:
            h, w = h // 2, w // 2
        out.append((h, w, c))
    return out


def block_passes(config: dict, level: int) -> int:
    """How often a block of ``level`` runs per forward (down and up ladders, block_repeat included)."""
    blocks, repeat = config["blocks"], config["block_repeat"]
    return blocks[0][level] * repeat[0][level] + blocks[1][::-1][level] * repeat[1][::-1][level]


def condition_tokens(model_name: str, config: dict) -> int:
    return 77 + 2 * config["c_clip_seq"] if model_name == "stage_c" else config["c_clip_seq"]


def _jit_module(module, *args):
    graphdef, state = nnx.split(module)
    f = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *args).compile()
    return lambda: f(state, *args).block_until_ready()


def _torch_runner(fn, *args):
    import torch

    def run():
        with torch.inference_mode():
            return fn(*args)
    return run


def _compare(jax_run, torch_run) -> dict:
    samples = alternate({"jax": jax_run, "torch": torch_run}, ROUNDS, warmup=1)
    j, t = summarize(samples["jax"]), summarize(samples["torch"])
    return {"jax_ms": 1e3 * j["median_s"], "torch_ms": 1e3 * t["median_s"],
            "ratio": j["median_s"] / t["median_s"] if t["median_s"] else None}


def _first_index(blocks, kind_cls) -> int | None:
    for i, block in enumerate(blocks):
        if isinstance(block, kind_cls):
            return i
    return None


def block_breakdown(model_name: str, config: dict, model, unet, batch: int, shape: tuple, whole: dict) -> dict:
    import torch

    from cascade_jax.nn.blocks import AttnBlock, ResBlock, TimestepBlock

    rng = np.random.default_rng(1)
    n_tokens, c_cond = condition_tokens(model_name, config), config["c_cond"]
    c_r_total = config["c_r"] * (1 + len(config["t_conds"]))
    clip = rng.standard_normal((batch, n_tokens, c_cond), dtype=np.float32)
    r_embed = rng.standard_normal((batch, c_r_total), dtype=np.float32)
    rows, ops = [], {}
    for level, (h, w, c) in enumerate(level_shapes(model_name, config, shape)):
        x = rng.standard_normal((batch, h, w, c), dtype=np.float32)
        x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        passes = block_passes(config, level)
        for kind_cls, extra_jax, extra_torch in ((ResBlock, (), ()),
                                                 (TimestepBlock, (jnp.asarray(r_embed),), (torch.from_numpy(r_embed),)),
                                                 (AttnBlock, (jnp.asarray(clip),), (torch.from_numpy(clip),))):
            idx = _first_index(model.down_blocks[level], kind_cls)
            if idx is None:
                continue
            ours, theirs = model.down_blocks[level][idx], unet.down_blocks[level][idx]
            timing = _compare(_jit_module(ours, jnp.asarray(x), *extra_jax), _torch_runner(theirs, x_nchw, *extra_torch))
            rows.append({"level": level, "block": kind_cls.__name__, "shape_nhwc": [batch, h, w, c],
                         "passes_per_forward": passes, **timing,
                         "jax_total_s": passes * timing["jax_ms"] / 1e3, "torch_total_s": passes * timing["torch_ms"] / 1e3})
            if kind_cls is ResBlock:
                ops[f"level{level} ResBlock"] = resblock_ops(ours, theirs, x, passes)
            elif kind_cls is AttnBlock:
                ops[f"level{level} AttnBlock"] = attnblock_ops(ours, theirs, x, clip, passes)
    covered = {k: sum(r[f"{k}_total_s"] for r in rows) for k in ("jax", "torch")}
    return {"blocks": rows, "ops": ops, "sum_of_blocks_s": covered, "whole_model_s": whole,
            "slower_in_jax": slower_ops(ops)}


def resblock_ops(ours, theirs, x: np.ndarray, passes: int) -> dict:
    """depthwise conv, LayerNorm, Linear c->4c, GELU, GRN, Linear 4c->c, each at its own input."""
    import torch

    b, h, w, c = x.shape
    jx = jnp.asarray(x)
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    hidden = np.random.default_rng(2).standard_normal((b, h, w, 4 * c), dtype=np.float32)
    jh, th = jnp.asarray(hidden), torch.from_numpy(hidden)
    # diffusers runs the channel MLP on x.permute(0, 2, 3, 1) of an NCHW tensor: a strided view.
    t_perm = tx.permute(0, 2, 3, 1)
    mlp_j, mlp_t = ours.channelwise, theirs.channelwise
    pairs = {
        "depthwise_conv3x3": (_jit_module(ours.depthwise, jx), _torch_runner(theirs.depthwise, tx)),
        "layernorm": (_jit_module(ours.norm, jx), _torch_runner(theirs.norm, tx)),
        "linear_c_to_4c": (_jit_module(mlp_j[0], jx), _torch_runner(mlp_t[0], t_perm)),
        "gelu_erf": (_jit_module(mlp_j[1], jh), _torch_runner(mlp_t[1], th)),
        "grn": (_jit_module(mlp_j[2], jh), _torch_runner(mlp_t[2], th)),
        "linear_4c_to_c": (_jit_module(mlp_j[4], jh), _torch_runner(mlp_t[4], th)),
    }
    return {name: {**_compare(*pair), "passes_per_forward": passes} for name, pair in pairs.items()}


def attnblock_ops(ours, theirs, x: np.ndarray, clip: np.ndarray, passes: int) -> dict:
    """kv mapper, LayerNorm, the whole attention (projections + softmax attention), and the
    scaled-dot-product attention alone."""
    import torch
    import torch.nn.functional as F

    b, h, w, c = x.shape
    jx = jnp.asarray(x)
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    heads = ours.attention.attn.nhead
    kv_len = h * w + clip.shape[1] if ours.self_attn else clip.shape[1]
    kv = np.random.default_rng(3).standard_normal((b, kv_len, c), dtype=np.float32)
    jkv, tkv = jnp.asarray(kv), torch.from_numpy(kv)
    q = np.random.default_rng(4).standard_normal((b, h * w, heads, c // heads), dtype=np.float32)
    k = kv[..., :c].reshape(b, kv_len, heads, c // heads)
    sdpa_j = jax.jit(jax.nn.dot_product_attention)
    jq, jk = jnp.asarray(q), jnp.asarray(k)
    tq, tk = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k))
    # kv already holds the pixel tokens (as diffusers' Attention receives it), so self_attn=False here.
    attn_graph, attn_state = nnx.split(ours.attention)
    attn_j = jax.jit(lambda s, a, kv_: nnx.merge(attn_graph, s)(a, kv_, self_attn=False))
    pairs = {
        "kv_mapper": (_jit_module(ours.kv_mapper, jnp.asarray(clip)), _torch_runner(theirs.kv_mapper, torch.from_numpy(clip))),
        "layernorm": (_jit_module(ours.norm, jx), _torch_runner(theirs.norm, tx)),
        "attention_total": (lambda: attn_j(attn_state, jx, jkv).block_until_ready(),
                            _torch_runner(lambda a, e: theirs.attention(a, encoder_hidden_states=e), tx, tkv)),
        "sdpa_only": (lambda: sdpa_j(jq, jk, jk).block_until_ready(), _torch_runner(F.scaled_dot_product_attention, tq, tk, tk)),
    }
    return {name: {**_compare(*pair), "passes_per_forward": passes} for name, pair in pairs.items()}


def slower_ops(ops: dict, threshold: float = 1.1) -> list[dict]:
    """Ops where JAX is over ``threshold`` x PyTorch, largest total time lost per forward first."""
    found = []
    for where, table in ops.items():
        for op, t in table.items():
            if t["ratio"] and t["ratio"] > threshold:
                lost = (t["jax_ms"] - t["torch_ms"]) * t["passes_per_forward"] / 1e3
                found.append({"where": where, "op": op, "ratio": t["ratio"], "lost_s_per_forward": lost})
    return sorted(found, key=lambda r: -r["lost_s_per_forward"])
