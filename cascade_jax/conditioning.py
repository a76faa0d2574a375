"""Prompts -> Stable Cascade's text conditioning, jitted, batched and cached.

Stage C takes ``clip_text`` (B, 77, 1280): the last CLIP-bigG encoder layer *before* the final
layer norm, and ``clip_text_pooled`` (B, 1, 1280): the projected embedding at the end-of-text
token. Stage B takes the same pooled embedding as ``clip``. Prompts are tokenized as the
official code does (truncation, ``padding="max_length"`` to 77, attention mask passed to the
encoder). The unconditional branch is the encoding of "" (not zeros), for both stages.

Long prompts: CLIP reads 77 tokens (75 of the prompt between <|startoftext|> and <|endoftext|>).
The official code and diffusers truncate the rest without a word; here a
``PromptTruncatedWarning`` says so. With ``long_prompts=True`` a prompt is cut into windows of 75
tokens, each encoded on its own as a full 77-token row, and the windows' states are concatenated
along the sequence axis (B, n·77, 1280) for Stage C, whose cross-attention takes any length; the
pooled embedding is the first window's. All prompts of one call (negative prompts included: the
CFG batch needs one length) get the same number of windows, shorter ones padded with windows of
"". A prompt of at most 75 tokens in a call of such prompts is encoded exactly as without the option.

Encodings are cached per 77-token row (an LRU of ``cache_size`` entries), so repeated prompts,
and the "" of every unconditional batch, are encoded once. Rows that miss are encoded together
in one jitted call whose batch is padded to a power of two (fewer compiles). The cache assumes
fixed weights: after changing the encoder's parameters (e.g. training a new token's embedding)
call :meth:`TextConditioner.set_text_encoder` or :meth:`clear_cache`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.data.clip_tokenizer import CLIPTokenizer
from cascade_jax.models.clip import CLIPTextEncoder


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than CLIP's window and its end is ignored (pass ``long_prompts=True``)."""


class TextConditioning(NamedTuple):
    clip_text: jax.Array  # (B, 77, C) Stage C; (B, n·77, C) with n windows of a long prompt
    clip_text_pooled: jax.Array  # (B, 1, P) Stage C; Stage B's ``clip``

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

    def set_text_encoder(self, text_encoder: CLIPTextEncoder):
        """Use these weights from now on (and forget encodings made with the old ones)."""
        vocab = text_encoder.text_model.embeddings.token_embedding.weight.shape[0]
        if vocab < len(self.tokenizer):
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the text encoder embeds only "
                             f"{vocab}: grow text_model.embeddings.token_embedding after adding tokens")
        self._graphdef, self._state = nnx.split(text_encoder)
        self.clear_cache()

    @property
    def text_encoder(self) -> CLIPTextEncoder:
        """The text encoder in use: new module objects over the same arrays, so changing it (e.g.
        growing its token table for a LoRA's new tokens) does not change the encoder in use."""
        return nnx.merge(self._graphdef, jax.tree.map(lambda x: x, self._state))

    def clear_cache(self):
        self._cache.clear()

    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}

    def __call__(self, prompts: str | Sequence[str], long_prompts: bool = False) -> TextConditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        windows = self._windows(prompts, long_prompts)
        rows = [row for prompt_rows in windows for row in prompt_rows]
        encoded = dict(zip(rows, self._lookup(rows)))
        clip_text = jnp.stack([jnp.concatenate([encoded[r][0] for r in prompt_rows]) for prompt_rows in windows])
        pooled = jnp.stack([encoded[prompt_rows[0]][1] for prompt_rows in windows])[:, None, :]
        return TextConditioning(clip_text, pooled)

    def _windows(self, prompts: list[str], long_prompts: bool) -> list[list[tuple[int, ...]]]:
        """Per prompt, the token rows (<|startoftext|> window <|endoftext|>, unpadded) to encode."""
        tok = self.tokenizer
        width = tok.model_max_length - 2
        bodies = [tok.encode(p, add_special_tokens=False) for p in prompts]
        if not long_prompts:
            for note in self._truncation_notes(prompts, bodies):
                warnings.warn(f"{note} Pass long_prompts=True (sample/generate.py --long-prompts) to use all of it.",
                              PromptTruncatedWarning, stacklevel=3)
            chunks = [[body[:width]] for body in bodies]
        else:
            chunks = [[body[i:i + width] for i in range(0, len(body), width)] or [[]] for body in bodies]
            count = max(len(c) for c in chunks)
            chunks = [c + [[]] * (count - len(c)) for c in chunks]
        return [[(tok.bos_token_id, *chunk, tok.eos_token_id) for chunk in c] for c in chunks]

    def truncation_notes(self, prompts: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
        """What a call would warn about (``PromptTruncatedWarning``), as text for a user who does not see the
        warnings (e.g. on a web page): one note per prompt longer than CLIP's window, [] when none is.
        ``names``: what to call each prompt (default "prompt 0", "prompt 1", ...)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bodies = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self._truncation_notes(prompts, bodies, names)

    def _truncation_notes(self, prompts: list[str], bodies: list[list[int]], names=None) -> list[str]:
        width = self.tokenizer.model_max_length - 2
        names = names or [f"prompt {i}" for i in range(len(prompts))]
        return [f"{name} ({prompt[:40]!r}...) has {len(body)} tokens; CLIP reads the first {width}, the rest is "
                "ignored (as in the official code and diffusers)."
                for name, prompt, body in zip(names, prompts, bodies) if len(body) > width]

    def _lookup(self, rows: list[tuple[int, ...]]) -> list[tuple[jax.Array, jax.Array]]:
        """(states (77, C), pooled (P,)) of each row, from the cache or encoded now (each new row once)."""
        missing = list(dict.fromkeys(r for r in rows if r not in self._cache))
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        for row in rows:  # refresh recency of the hits before storing (LRU order)
            if row in self._cache:
                self._cache.move_to_end(row)
        entries = {**{r: self._cache[r] for r in rows if r in self._cache},
                   **dict(zip(missing, self._encode_rows(missing)))}
        for row in missing:
            self._store(row, entries[row])
        return [entries[r] for r in rows]

    def with_unconditional(self, prompts, negative_prompts=None, *,
                           long_prompts: bool = False) -> tuple[TextConditioning, TextConditioning]:
        """(conditional, unconditional); the unconditional prompt is "" unless negative prompts are given."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        both = self(list(prompts) + list(negative_prompts), long_prompts)
        n = len(prompts)
        return (TextConditioning(both.clip_text[:n], both.clip_text_pooled[:n]),
                TextConditioning(both.clip_text[n:], both.clip_text_pooled[n:]))

    def _encode_rows(self, rows: list[tuple[int, ...]]):
        if not rows:
            return []
        length = self.tokenizer.model_max_length
        padded = rows + [rows[0]] * (bucket_size(len(rows)) - len(rows))
        ids = np.full((len(padded), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(padded), length), np.int32)
        for i, row in enumerate(padded):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        clip_text, pooled = _encode_jit(self._graphdef, self._state, jnp.asarray(ids), jnp.asarray(mask))
        if self.dtype is not None:
            clip_text, pooled = clip_text.astype(self.dtype), pooled.astype(self.dtype)
        return [(clip_text[i], pooled[i]) for i in range(len(rows))]

    def _store(self, key, value):
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
