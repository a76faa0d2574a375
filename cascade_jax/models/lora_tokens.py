"""New and retrained text tokens for LoRA (the official ``train_tokens`` and ``ReToken``).

``train_tokens`` entries are ``[token_or_regex, init_regex]``, as in the official configs:

* ``[x]`` or ``<x>`` adds a new token to the tokenizer and appends one row to the text encoder's
  token table, initialised as the mean of the rows whose vocabulary string matches ``init_regex``
  (zeros when none matches, or when ``init_regex`` is None);
* anything else is a regex selecting existing tokens by their vocabulary string.

The selected rows then get trainable deltas (:class:`~cascade_jax.models.lora.TokenRows`): the
table itself stays frozen and only the delta rows train. Functions here take the token
``Embedding`` module (``token_embedding(text_encoder)``), so they work on any table.
"""

from __future__ import annotations

import re
import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.models.lora import AdaptedWeight, TokenDeltas, TokenRows, check_adapter_name, refresh_merged


def token_embedding(text_encoder) -> nnx.Module:
    """The token ``Embedding`` of a :class:`~cascade_jax.models.clip.CLIPTextEncoder`."""
    return text_encoder.text_model.embeddings.token_embedding


def is_new_token(entry: str) -> bool:
    return (entry.startswith("[") and entry.endswith("]")) or (entry.startswith("<") and entry.endswith(">"))


def _base_table(embedding) -> nnx.Variable:
    weight = embedding.weight
    return weight.original if isinstance(weight, AdaptedWeight) else weight


def table_size(embedding) -> int:
    return int(_base_table(embedding).shape[0])


def _init_row(tokenizer, table, init_regex):
    """Mean of the rows whose token matches ``init_regex`` (float32 mean), zeros if none do."""
    rows = table.shape[0]
    ids = [] if init_regex is None else [i for t, i in tokenizer.encoder.items()
                                         if i < rows and re.search(init_regex, t) is not None]
    if not ids:
        if init_regex is not None:
            warnings.warn(f"no token matches the init regex {init_regex!r}; the new row starts at zeros")
        return jnp.zeros((1, table.shape[1]), table.dtype)
    return table[jnp.asarray(ids)].astype(jnp.float32).mean(axis=0, keepdims=True).astype(table.dtype)


def add_train_tokens(tokenizer, embedding, train_tokens) -> list[int]:
    """Apply the official ``train_tokens`` to ``tokenizer`` and the table; return the selected ids.

    The ids come out in the order the official trainer stores them (``list(set(ids))``), so the
    file it writes matches the official one row for row. A new token already in the tokenizer
    (a second LoRA with the same trigger word) keeps its id and row.
    """
    selected = []
    for entry, init_regex in train_tokens:
        if is_new_token(entry):
            if entry not in tokenizer.encoder:
                tokenizer.add_tokens([entry])
                table = _base_table(embedding)
                table.set_value(jnp.concatenate([table[...], _init_row(tokenizer, table[...], init_regex)]))
                _refresh_embedding(embedding)
            token_id = tokenizer.token_to_id(entry)
            if token_id >= table_size(embedding):
                raise ValueError(f"token {entry!r} has id {token_id} but the token table has only "
                                 f"{table_size(embedding)} rows: the text encoder does not match the tokenizer")
            selected.append(token_id)
        else:
            selected += [i for t, i in tokenizer.encoder.items() if re.search(entry, t) is not None]
    return list(set(selected))


def _refresh_embedding(embedding):
    if isinstance(embedding.weight, AdaptedWeight):
        refresh_merged(embedding.weight)


def _adapted_table(embedding) -> AdaptedWeight:
    if not isinstance(embedding.weight, AdaptedWeight):
        embedding.weight = AdaptedWeight(embedding.weight)
    return embedding.weight


def init_token_rows(embedding, name: str, indices, tokenizer=None, dtype=jnp.float32):
    """Trainable zero deltas on rows ``indices`` under LoRA ``name`` (official init)."""
    table = _base_table(embedding)
    decoder = tokenizer.decoder if tokenizer is not None else {}
    attach_token_rows(embedding, name, TokenDeltas(np.asarray(indices, np.int64),
                                                   np.zeros((len(indices), table.shape[1]), dtype),
                                                   [decoder.get(int(i)) for i in indices]))


def attach_token_rows(embedding, name: str, deltas: TokenDeltas, strength: float = 1.0):
    """Add ``deltas`` under LoRA ``name``; indices and row width are checked against the table."""
    rows, width = table_size(embedding), int(_base_table(embedding).shape[1])
    bad = [int(i) for i in deltas.indices if not 0 <= int(i) < rows]
    if bad:
        raise ValueError(f"token rows {bad} are outside the token table of {rows} rows: add the LoRA's new tokens "
                         "first (train_tokens)")
    if deltas.rows.shape != (len(deltas.indices), width):
        raise ValueError(f"embeddings.embeddings has shape {tuple(deltas.rows.shape)}, the token table needs "
                         f"({len(deltas.indices)}, {width}): the LoRA was made for another text encoder")
    weight = _adapted_table(embedding)
    check_adapter_name(weight, name, "token_embedding.weight")
    weight.adapters[name] = TokenRows(deltas.indices, deltas.rows, strength, deltas.tokens)
    refresh_merged(weight)


def token_deltas(embedding, name: str) -> TokenDeltas | None:
    weight = embedding.weight
    if isinstance(weight, AdaptedWeight) and name in weight.adapters:
        return weight.adapters[name].to_data()
    return None


def resolve_token_ids(tokenizer, embedding, deltas: TokenDeltas, train_tokens, base_vocab: int | None):
    """Token ids in this tokenizer for the rows of a LoRA file (new tokens added and initialised).

    With token strings (files written here) each row goes to its token's id; new tokens are added
    first from ``train_tokens``. Without (official files), indices are kept; rows for ids beyond the
    vocabulary need ``train_tokens`` (the config the LoRA was trained with) to recreate them.
    """
    new_entries = [[e, r] for e, r in train_tokens if is_new_token(e)]
    indices = [int(i) for i in deltas.indices]
    beyond = [i for i in indices if i >= table_size(embedding)]
    if all(t is None for t in deltas.tokens):
        if beyond and not new_entries:
            raise ValueError(f"the LoRA has rows for token ids {beyond}, beyond the vocabulary of "
                             f"{table_size(embedding)}, and does not name its new tokens (an official file): pass "
                             "train_tokens, the [[token, init regex], ...] of the config it was trained with")
        add_train_tokens(tokenizer, embedding, new_entries)
        return np.asarray(indices, np.int64)
    add_train_tokens(tokenizer, embedding, new_entries)
    ids = []
    for index, token in zip(indices, deltas.tokens):
        if token is None or token not in tokenizer.encoder:
            raise ValueError(f"token row {index} is for {token!r}, which this tokenizer does not know "
                             f"(new tokens in the file: {[e for e, _ in new_entries]})")
        token_id = tokenizer.token_to_id(token)
        if base_vocab is not None and index < base_vocab and token_id != index:
            raise ValueError(f"token {token!r} has id {token_id} here but {index} in the LoRA: another tokenizer")
        ids.append(token_id)
    return np.asarray(ids, np.int64)
