"""CLIP text and vision encoders (transformers' CLIP*ModelWithProjection), inference, Flax NNX.

Stable Cascade conditions Stage C on OpenCLIP ViT-bigG-14's text tower (the last encoder layer's
output *before* the final layer norm, and the projected pooled embedding) and, for image
variation, on ViT-L/14's projected image embedding. Module paths mirror the Hugging Face key
names (``text_model.encoder.layers.0.self_attn.q_proj.weight``, ``visual_projection.weight``),
so ``model.safetensors`` of ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``
loads through the identity ("official") key plan. Constructor arguments are the fields of
transformers' ``CLIPTextConfig`` / ``CLIPVisionConfig`` with the same defaults, so a
``config.json`` passes through :func:`text_kwargs_from_hf_config` / :func:`vision_kwargs_from_hf_config`.

Images are NHWC (B, H, W, C), as everywhere in cascade_jax.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.models.config_forms import INT, NUMBER, Choice
from cascade_jax.nn.functional import gelu
from cascade_jax.nn.layers import Conv2d, Embedding, LayerNorm, Linear
from cascade_jax.nn.params import param

ACTIVATIONS = {
    "gelu": gelu,  # exact (erf), bigG-14
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP, ViT-L/14
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class CLIPAttention(nnx.Module):
    """Self-attention with separate q/k/v/out projections (transformers' ``CLIPAttention``)."""

    def __init__(self, hidden_size: int, num_attention_heads: int, *, rngs):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
        self.num_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.k_proj = Linear(hidden_size, hidden_size, rngs=rngs)
        self.v_proj = Linear(hidden_size, hidden_size, rngs=rngs)
        self.q_proj = Linear(hidden_size, hidden_size, rngs=rngs)
        self.out_proj = Linear(hidden_size, hidden_size, rngs=rngs)

    def __call__(self, x, mask=None, is_causal=False):
        """``mask``: boolean (B, 1, T, T), True where a query may attend to a key."""
        b, t, c = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=self.head_dim ** -0.5)
        return self.out_proj(out.reshape(b, t, c))


class CLIPMLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, *, rngs):
        self.act = activation(hidden_act)
        self.fc1 = Linear(hidden_size, intermediate_size, rngs=rngs)
        self.fc2 = Linear(intermediate_size, hidden_size, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size, intermediate_size, num_attention_heads, hidden_act, layer_norm_eps, *, rngs):
        self.self_attn = CLIPAttention(hidden_size, num_attention_heads, rngs=rngs)
        self.layer_norm1 = LayerNorm(hidden_size, eps=layer_norm_eps, rngs=rngs)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act, rngs=rngs)
        self.layer_norm2 = LayerNorm(hidden_size, eps=layer_norm_eps, rngs=rngs)

    def __call__(self, x, mask=None, is_causal=False):
        x = x + self.self_attn(self.layer_norm1(x), mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    stacked = 0  # stack_layers(): the layers as one, its parameters stacked over this many
    unroll_stacked = False  # run them as straight-line code: planning's estimate only

    def __init__(self, num_hidden_layers, *layer_args, rngs):
        self.layers = nnx.List([CLIPEncoderLayer(*layer_args, rngs=rngs) for _ in range(num_hidden_layers)])

    def stack_layers(self):
        """Keep the layers as one layer with stacked parameters, run as a scan: the same outputs, one layer's
        program to compile (scan_blocks training; frozen encoders only: keys change while stacked)."""
        from cascade_jax.models.unet_stack import stack_block

        if not self.stacked:
            self.stacked = len(self.layers)
            self.layers = nnx.List([stack_block(list(self.layers))])

    def unstack_layers(self):
        """The inverse of :meth:`stack_layers`: per-layer modules under their official keys again."""
        from cascade_jax.models.unet_stack import unstack_block

        if self.stacked:
            self.layers = nnx.List(unstack_block(self.layers[0], self.stacked))
            self.stacked = 0

    def __call__(self, x, mask=None, is_causal=False):
        """All hidden states: the input, then each layer's output (transformers' ``hidden_states``)."""
        if self.stacked:
            graphdef, state = nnx.split(self.layers[0])

            def body(h, layer_state):
                h = nnx.merge(graphdef, layer_state)(h, mask, is_causal)
                return h, h

            _, outputs = jax.lax.scan(body, x, state, unroll=self.unroll_stacked)
            return [x, *(outputs[i] for i in range(self.stacked))]
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], mask, is_causal))
        return states


# ---------------------------------------------------------------------------------------- text
class CLIPTextOutput(NamedTuple):
    last_hidden_state_pre_norm: jax.Array  # (B, T, C) last encoder layer, before final_layer_norm: Stage C's clip_text
    last_hidden_state: jax.Array  # (B, T, C) after final_layer_norm (transformers' last_hidden_state)
    pooled_output: jax.Array  # (B, C) final-normed state at the end-of-text token
    text_embeds: jax.Array  # (B, projection_dim) projected pooled output: Stage C/B's pooled text
    hidden_states: tuple | None = None  # embeddings + every layer's output, when asked for


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings, *, rngs):
        self.token_embedding = Embedding(vocab_size, hidden_size, rngs=rngs)
        self.position_embedding = Embedding(max_position_embeddings, hidden_size, rngs=rngs)

    def __call__(self, input_ids):
        length = input_ids.shape[-1]
        if length > self.position_embedding.weight.shape[0]:
            raise ValueError(f"sequence length {length} > max_position_embeddings "
                             f"{self.position_embedding.weight.shape[0]}: truncate the prompt tokens")
        return self.token_embedding(input_ids) + self.position_embedding.weight[...][:length]


class CLIPTextTransformer(nnx.Module):
    """transformers' ``CLIPTextModel.text_model`` body: embeddings, causal encoder, final LN."""

    def __init__(self, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                 max_position_embeddings, hidden_act, layer_norm_eps, *, rngs):
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings, rngs=rngs)
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
                                   hidden_act, layer_norm_eps, rngs=rngs)
        self.final_layer_norm = LayerNorm(hidden_size, eps=layer_norm_eps, rngs=rngs)


def text_attention_mask(attention_mask, length: int):
    """Causal AND key-padding, as transformers' ``create_causal_mask``: (B, 1, T, T) booleans.

    Padded *queries* are not masked: their outputs, which Stage C attends to (all 77 tokens),
    are computed as in PyTorch. A query whose every allowed key is padding (only possible when
    position 0 is masked) attends uniformly to all keys, as transformers' eager attention does (its sdpa path
    gives other values at those positions only).
    """
    causal = jnp.tril(jnp.ones((length, length), bool))
    keys = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    return causal[None, None] & keys


def end_of_text_positions(input_ids, eos_token_id: int):
    """Where transformers pools: the first ``eos_token_id`` (the argmax of ids if eos_token_id == 2).

    eos_token_id == 2 marks configs from before transformers PR #24773, which took the largest
    id (the end-of-text token in CLIP's vocabulary, unless new tokens were added after it).
    A row without the eos token pools position 0, as torch's argmax of all zeros does.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEncoder(nnx.Module):
    """``CLIPTextModelWithProjection``: ``model(input_ids, attention_mask) -> CLIPTextOutput``.

    ViT-bigG-14 (Stable Cascade): hidden_size 1280, intermediate_size 5120, 32 layers, 20 heads,
    projection_dim 1280, hidden_act "gelu" (exact); see configs/models/clip_text_bigg14.yaml.
    """

    CONFIG_FORMS = {**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "projection_dim",
                                     "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                                     "eos_token_id"), INT),
                    "hidden_act": Choice(*sorted(ACTIVATIONS)), "layer_norm_eps": NUMBER}

    def __init__(self, vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                 num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407, *, rngs):
        if not isinstance(eos_token_id, int):
            raise ValueError(f"eos_token_id={eos_token_id!r}: expected one integer id")
        self.eos_token_id = eos_token_id
        self.text_model = CLIPTextTransformer(vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                                              num_attention_heads, max_position_embeddings, hidden_act,
                                              layer_norm_eps, rngs=rngs)
        self.text_projection = Linear(hidden_size, projection_dim, bias=False, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        """``input_ids`` int (B, T); ``attention_mask`` (B, T) with 1 for real tokens (None: all real)."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        body = self.text_model
        x = body.embeddings(input_ids)
        if attention_mask is None:  # plain causal: lets cuDNN use its causal kernel
            states = body.encoder(x, is_causal=True)
        else:
            states = body.encoder(x, mask=text_attention_mask(attention_mask, input_ids.shape[1]))
        last = body.final_layer_norm(states[-1])
        pooled = last[jnp.arange(last.shape[0]), end_of_text_positions(input_ids, self.eos_token_id)]
        return CLIPTextOutput(states[-1], last, pooled, self.text_projection(pooled),
                              tuple(states) if output_hidden_states else None)

    def resize_token_embeddings(self, num_tokens: int, copy_from=None):
        """Grow the vocabulary to ``num_tokens`` after ``tokenizer.add_tokens`` (new-token training).

        New rows copy the embeddings of the ids in ``copy_from`` (one per new token, e.g. the id
        of a word the new token starts from), else the mean of the existing rows (transformers'
        default). Shrinking is refused: it would silently drop trained tokens.
        """
        var = self.text_model.embeddings.token_embedding.weight
        old = var[...]
        extra = num_tokens - old.shape[0]
        if extra < 0:
            raise ValueError(f"num_tokens={num_tokens} < current vocabulary {old.shape[0]}: shrinking is not supported")
        if copy_from is None:
            new_rows = jnp.broadcast_to(old.mean(axis=0, dtype=jnp.float32).astype(old.dtype), (extra, old.shape[1]))
        else:
            copy_from = jnp.asarray(copy_from, jnp.int32)
            if copy_from.shape != (extra,):
                raise ValueError(f"copy_from has {copy_from.shape[0] if copy_from.ndim else 1} ids for {extra} new tokens")
            new_rows = old[copy_from]
        var.set_value(jnp.concatenate([old, new_rows], axis=0))


# -------------------------------------------------------------------------------------- vision
class CLIPVisionOutput(NamedTuple):
    image_embeds: jax.Array  # (B, projection_dim): Stage C's clip_img
    last_hidden_state: jax.Array  # (B, 1 + patches, C) last encoder layer (no post_layernorm, as transformers)
    pooled_output: jax.Array  # (B, C) post_layernorm of the class token
    hidden_states: tuple | None = None


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, hidden_size, image_size, patch_size, num_channels, *, rngs):
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.class_embedding = param(rngs, (hidden_size,), torch_layout="same", axes=("embed",))
        self.patch_embedding = Conv2d(num_channels, hidden_size, patch_size, stride=patch_size, bias=False, rngs=rngs)
        self.position_embedding = Embedding((image_size // patch_size) ** 2 + 1, hidden_size, rngs=rngs)

    def __call__(self, pixel_values):
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values are {h}x{w}, the model takes {self.image_size}x{self.image_size}: "
                             "preprocess with cascade_jax.data.clip_preprocess")
        patches = self.patch_embedding(pixel_values)  # (B, h/p, w/p, C): row-major, as torch's flatten(2)
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.weight[...]


class CLIPVisionTransformer(nnx.Module):
    """transformers' ``CLIPVisionModel.vision_model``: embeddings, pre_layrnorm, encoder, post_layernorm."""

    def __init__(self, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_channels,
                 image_size, patch_size, hidden_act, layer_norm_eps, *, rngs):
        self.embeddings = CLIPVisionEmbeddings(hidden_size, image_size, patch_size, num_channels, rngs=rngs)
        self.pre_layrnorm = LayerNorm(hidden_size, eps=layer_norm_eps, rngs=rngs)  # sic: the checkpoint's name
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
                                   hidden_act, layer_norm_eps, rngs=rngs)
        self.post_layernorm = LayerNorm(hidden_size, eps=layer_norm_eps, rngs=rngs)


class CLIPVisionEncoder(nnx.Module):
    """``CLIPVisionModelWithProjection``: ``model(pixel_values) -> CLIPVisionOutput``.

    ``pixel_values``: NHWC (B, image_size, image_size, C), CLIP-normalised
    (:func:`cascade_jax.data.clip_preprocess.preprocess_images`). ViT-L/14 (Stable Cascade):
    hidden_size 1024, 24 layers, 16 heads, patch 14, projection_dim 768, quick_gelu.
    """

    CONFIG_FORMS = {**dict.fromkeys(("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                                     "num_attention_heads", "num_channels", "image_size", "patch_size"), INT),
                    "hidden_act": Choice(*sorted(ACTIVATIONS)), "layer_norm_eps": NUMBER}

    def __init__(self, hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, *, rngs):
        self.vision_model = CLIPVisionTransformer(hidden_size, intermediate_size, num_hidden_layers,
                                                  num_attention_heads, num_channels, image_size, patch_size,
                                                  hidden_act, layer_norm_eps, rngs=rngs)
        self.visual_projection = Linear(hidden_size, projection_dim, bias=False, rngs=rngs)

    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionOutput:
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be NHWC (batch, height, width, channels), got {pixel_values.shape}")
        body = self.vision_model
        states = body.encoder(body.pre_layrnorm(body.embeddings(pixel_values)))
        pooled = body.post_layernorm(states[-1][:, 0])
        return CLIPVisionOutput(self.visual_projection(pooled), states[-1], pooled,
                                tuple(states) if output_hidden_states else None)


# ------------------------------------------------------------------------------ HF config.json
def _kwargs_from_hf(cls, config: dict, sub_config: str) -> dict:
    if sub_config in config and isinstance(config[sub_config], dict):  # a whole CLIPModel config.json
        config = config[sub_config]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "rngs"}
    kwargs = {k: v for k, v in config.items() if k in accepted}
    for key in ("image_size", "patch_size"):
        if isinstance(kwargs.get(key), (list, tuple)):
            if len(set(kwargs[key])) != 1:
                raise ValueError(f"{key}={kwargs[key]}: only square images/patches are supported")
            kwargs[key] = kwargs[key][0]
    return kwargs


def text_kwargs_from_hf_config(config: dict) -> dict:
    """``CLIPTextEncoder`` kwargs from a transformers CLIPTextConfig (or CLIPConfig) dict."""
    return _kwargs_from_hf(CLIPTextEncoder, config, "text_config")


def vision_kwargs_from_hf_config(config: dict) -> dict:
    """``CLIPVisionEncoder`` kwargs from a transformers CLIPVisionConfig (or CLIPConfig) dict."""
    return _kwargs_from_hf(CLIPVisionEncoder, config, "vision_config")


__all__ = ["CLIPTextEncoder", "CLIPVisionEncoder", "CLIPTextOutput", "CLIPVisionOutput",
           "text_kwargs_from_hf_config", "vision_kwargs_from_hf_config", "end_of_text_positions",
           "text_attention_mask"]
