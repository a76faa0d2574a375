"""Prompts -> Stable Cascade's text conditioning, jitted, batched and cached.

Stage C takes ``clip_text`` (B, 77, 1280): the last CLIP-bigG encoder layer *before* the final
layer norm, and ``clip_text_pooled`` (B, 1, 1280): the projected embedding at the end-of-text
token. Stage B takes the same pooled embedding as ``clip``. Prompts are tokenized as the
official code does (truncation, ``padding="max_length"`` to 77, attention mask passed to the
encoder). The unconditional branch is the encoding of "" (not zeros), for both stages.

Encodings are cached per token sequence (an LRU of ``cache_size`` entries), so repeated
prompts, and the "" of every unconditional batch, are encoded once. Prompts that miss are
encoded together in one jitted call whose batch is padded to a power of two (fewer compiles).
The cache assumes fixed weights: after changing the encoder's parameters (e.g. training a
new token's embedding) call :meth:`TextConditioner.set_text_encoder` or :meth:`clear_cache`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.models.clip import CLIPTextEncoder
from cascade_jax.models.clip_tokenizer import CLIPTokenizer


class TextConditioning(NamedTuple):
    clip_text: jax.Array  # (B, 77, C) Stage C
    clip_text_pooled: jax.Array  # (B, 1, P) Stage C; Stage B's ``clip``

    @property
    def clip(self) -> jax.Array:
        """Stage B's pooled text input (B, 1, P)."""
        return self.clip_text_pooled

    def stage_c(self) -> dict:
        return {"clip_text": self.clip_text, "clip_text_pooled": self.clip_text_pooled}

    def stage_b(self) -> dict:
        return {"clip": self.clip_text_pooled}


def _encode(graphdef, state, input_ids, attention_mask):
    out = nnx.merge(graphdef, state)(input_ids, attention_mask)
    return out.last_hidden_state_pre_norm, out.text_embeds


_encode_jit = jax.jit(_encode, static_argnums=0)


def bucket_size(n: int) -> int:
    """The padded batch of ``n`` prompts to encode: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


class TextConditioner:
    """``conditioner(prompts) -> TextConditioning``; ``conditioner.with_unconditional(prompts)``."""

    def __init__(self, text_encoder: CLIPTextEncoder, tokenizer: CLIPTokenizer, *, cache_size: int = 256,
                 dtype=None):
        self.tokenizer = tokenizer
        self.cache_size = int(cache_size)
        self.dtype = dtype
        self._cache: OrderedDict[tuple, tuple[jax.Array, jax.Array]] = OrderedDict()
        self.hits = self.misses = 0
        self.set_text_encoder(text_encoder)

    @classmethod
    def from_pretrained(cls, text_encoder_dir, tokenizer_dir, *, dtype=None, sharding=None, **kwargs):
        """A converted text encoder (``cascade_jax.load_model`` directory) and a tokenizer folder."""
        from cascade_jax import load_model

        return cls(load_model(text_encoder_dir, dtype=dtype, sharding=sharding),
                   CLIPTokenizer.from_pretrained(tokenizer_dir), **kwargs)

    def set_text_encoder(self, text_encoder: CLIPTextEncoder):
        """Use these weights from now on (and forget encodings made with the old ones)."""
        vocab = text_encoder.text_model.embeddings.token_embedding.weight.shape[0]
        if vocab < len(self.tokenizer):
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the text encoder embeds only "
                             f"{vocab}: grow text_model.embeddings.token_embedding after adding tokens")
        self._graphdef, self._state = nnx.split(text_encoder)
        self.clear_cache()

    def clear_cache(self):
        self._cache.clear()

    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}

    def __call__(self, prompts: str | Sequence[str]) -> TextConditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        tokens = self.tokenizer(prompts)
        keys = [tuple(row[mask > 0].tolist()) for row, mask in zip(tokens["input_ids"], tokens["attention_mask"])]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = self._encode_rows(tokens, [keys.index(k) for k in missing])
        for key in keys:  # refresh recency of the hits before storing (LRU order)
            if key in self._cache:
                self._cache.move_to_end(key)
        entries = {**{k: self._cache[k] for k in keys if k in self._cache}, **dict(zip(missing, fresh))}
        for key, value in zip(missing, fresh):
            self._store(key, value)
        clip_text = jnp.stack([entries[k][0] for k in keys])
        pooled = jnp.stack([entries[k][1] for k in keys])[:, None, :]
        return TextConditioning(clip_text, pooled)

    def with_unconditional(self, prompts, negative_prompts=None) -> tuple[TextConditioning, TextConditioning]:
        """(conditional, unconditional); the unconditional prompt is "" unless negative prompts are given."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        both = self(list(prompts) + list(negative_prompts))
        n = len(prompts)
        return (TextConditioning(both.clip_text[:n], both.clip_text_pooled[:n]),
                TextConditioning(both.clip_text[n:], both.clip_text_pooled[n:]))

    def _encode_rows(self, tokens, rows: list[int]):
        if not rows:
            return []
        padded = rows + [rows[0]] * (bucket_size(len(rows)) - len(rows))
        ids = jnp.asarray(tokens["input_ids"][padded])
        mask = jnp.asarray(tokens["attention_mask"][padded])
        clip_text, pooled = _encode_jit(self._graphdef, self._state, ids, mask)
        if self.dtype is not None:
            clip_text, pooled = clip_text.astype(self.dtype), pooled.astype(self.dtype)
        return [(clip_text[i], pooled[i]) for i in range(len(rows))]

    def _store(self, key, value):
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def encode_prompts(text_encoder: CLIPTextEncoder, tokenizer: CLIPTokenizer, prompts) -> TextConditioning:
    """One uncached encoding of ``prompts`` (for scripts; pipelines keep a :class:`TextConditioner`)."""
    return TextConditioner(text_encoder, tokenizer, cache_size=0)(prompts)
