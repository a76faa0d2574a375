"""A small CLIP-format tokenizer learned from a word list (the embedded demo's tokenizer).

The released CLIP vocabulary has 49,408 entries; a text encoder that only ever reads a
few dozen words would spend most of its weights on the embedding table. This learns byte-pair
merges (most frequent adjacent pair first, ties broken by the pair itself, so the result is
deterministic) until every given word is one token, and writes an ordinary Hugging Face
CLIPTokenizer folder: the 256 byte symbols, the same with '</w>', the merged symbols, then
``<|startoftext|>`` and ``<|endoftext|>``, the layout of the released vocabulary. Any other text
still tokenizes, into byte-level pieces.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cascade_jax.data.clip_tokenizer import END_OF_WORD, bytes_to_unicode, write_bpe_folder


def _symbols(word: str, byte_encoder) -> tuple[str, ...]:
    mapped = [byte_encoder[b] for b in word.encode("utf-8")]
    return tuple(mapped[:-1]) + (mapped[-1] + END_OF_WORD,)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(words) -> list[tuple[str, str]]:
    """BPE merges after which each of ``words`` (lower-case, no spaces) is a single symbol."""
    byte_encoder = bytes_to_unicode()
    words = sorted(set(words))
    bad = [w for w in words if not w or w != w.lower() or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"words must be non-empty, lower-case and without spaces (CLIP lower-cases and splits "
                         f"on spaces), got {bad}")
    pieces = {w: _symbols(w, byte_encoder) for w in words}
    merges = []
    while True:
        counts = Counter(pair for symbols in pieces.values() for pair in zip(symbols, symbols[1:]))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        pieces = {w: _merge(s, pair) for w, s in pieces.items()}


def write_word_tokenizer_folder(words, folder, *, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for ``words`` into ``folder``."""
    return write_bpe_folder(learn_merges(words), folder, model_max_length=model_max_length)
