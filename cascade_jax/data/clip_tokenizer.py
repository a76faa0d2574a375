"""The CLIP byte-level BPE tokenizer, pure Python, equal to transformers' ``CLIPTokenizer``.

Reads a Hugging Face ``CLIPTokenizer`` folder (Stable Cascade's ``tokenizer/``): ``vocab.json``,
``merges.txt`` and ``tokenizer_config.json`` / ``special_tokens_map.json`` for the special tokens
and ``model_max_length``; offline, no network, no ``tokenizers`` or ``torch`` needed.

Text cleaning follows transformers 5.x (the Rust ``tokenizers`` backend, which every
``CLIPTokenizer`` is in 5.x): Unicode NFC, every run of whitespace becomes one space, then
per-character lowercasing (so a word-final capital sigma becomes 'σ', not 'ς'). The original
OpenAI tokenizer also ran ``ftfy.fix_text`` and ``html.unescape``; transformers 5.x does
neither (ftfy is not consulted even when installed), so neither do we: '&amp;' stays '&amp;'.

Then, as in ``tokenizers``:
1. added tokens that are not normalised (special tokens such as ``<|endoftext|>``) are cut out
   of the raw text, leftmost-longest;
2. each remaining piece is cleaned as above, and normalised added tokens (the default for
   :meth:`CLIPTokenizer.add_tokens`, e.g. a LoRA trigger word) are cut out of the cleaned text;
3. the rest is split with CLIP's pattern (contractions, letter runs, single digits, runs of
   other non-space characters) and then GPT-2's (as tokenizers' ByteLevel step does), mapped to
   byte-level unicode and merged with the BPE ranks, the last symbol of each word carrying the
   ``</w>`` suffix.
``<|startoftext|>`` and ``<|endoftext|>`` wrap the ids; truncation keeps the first
``max_length - 2`` content tokens; padding is on the right with the pad token, mask 0.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from cascade_jax import storage

# CLIP's pre-tokenisation pattern (transformers' CLIPTokenizer / OpenAI's simple_tokenizer).
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# tokenizers' ByteLevel pre-tokenizer (use_regex=True) then splits each piece with GPT-2's pattern;
# this only matters for the '<|startoftext|>' / '<|endoftext|>' alternatives above, which it cuts
# into '<|', 'startoftext', '|>' (when such text is not caught as an added token first).
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
WHITESPACE = regex.compile(r"\s+")
END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean_text(text: str) -> str:
    """transformers 5.x CLIP normaliser: NFC, whitespace runs -> ' ', per-character lowercase."""
    text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool = False
    normalized: bool = True  # matched in cleaned (lowercased) text; special tokens are matched raw


def _token_content(value) -> str | None:
    """A special token from a config: a string or a serialised ``AddedToken`` dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}")


class CLIPTokenizer:
    """CLIP BPE tokenizer; ``tokenizer(prompts)`` returns ids and attention mask padded to 77."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                 unk_token="<|endoftext|>", model_max_length=77):
        self.encoder = dict(vocab)
        self.base_vocab_size = len(self.encoder)  # ids from here on are added tokens
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.model_max_length = int(model_max_length)
        self.added_tokens: dict[str, AddedToken] = {}
        self._cache: dict[str, list[str]] = {}
        for token in (bos_token, eos_token, pad_token, unk_token):
            self._add(AddedToken(token, special=True, normalized=False))
        self._refresh_patterns()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder) -> "CLIPTokenizer":
        """Load a Hugging Face CLIPTokenizer folder (vocab.json, merges.txt and the two configs); a folder in a
        bucket is read from a local copy."""
        folder = storage.local_copy(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: a CLIP tokenizer folder needs vocab.json "
                                        "and merges.txt (Stable Cascade's tokenizer/ folder has both)")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = read_merges(folder / "merges.txt")
        config = _read_json(folder / "tokenizer_config.json")
        # As in transformers, special_tokens_map.json wins over tokenizer_config.json.
        config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items()
                       if k.endswith("_token")})
        kwargs = {k: _token_content(config[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                  if config.get(k) is not None}
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 10 ** 6:  # transformers' "very large" sentinel
            max_length = 77
        tokenizer = cls(vocab, merges, model_max_length=max_length, **kwargs)
        tokenizer._load_added_tokens(folder, config)
        return tokenizer

    def _load_added_tokens(self, folder: Path, config: dict):
        """Tokens added after training: tokenizer_config's added_tokens_decoder, added_tokens.json."""
        entries = []
        for token_id, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            entries.append((int(token_id), spec["content"], bool(spec.get("special", False)),
                            bool(spec.get("normalized", not spec.get("special", False)))))
        for content, token_id in sorted(_read_json(folder / "added_tokens.json").items(), key=lambda kv: kv[1]):
            entries.append((int(token_id), content, False, True))
        for token_id, content, special, normalized in entries:
            known = self.encoder.get(content)
            if known is not None and known != token_id:
                raise ValueError(f"{folder}: added token {content!r} has id {token_id} but vocab.json says {known}")
            if known is None and token_id != len(self.encoder):
                raise ValueError(f"{folder}: added token {content!r} has id {token_id}, expected {len(self.encoder)}")
            self.encoder[content] = token_id
            # The file's flags win, special tokens included (a normalised special token is also
            # found in lowercased text, as tokenizers does).
            self.added_tokens[content] = AddedToken(content, special=special, normalized=normalized)
        self._refresh_patterns()

    # ------------------------------------------------------------------ vocabulary
    @property
    def decoder(self) -> dict[int, str]:
        return {i: t for t, i in self.encoder.items()}

    def __len__(self):
        return len(self.encoder)

    def token_to_id(self, token: str) -> int:
        if token not in self.encoder:
            raise KeyError(f"token {token!r} is not in the vocabulary of {len(self.encoder)} tokens")
        return self.encoder[token]

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    def add_tokens(self, tokens, special_tokens: bool = False) -> int:
        """Add whole tokens (e.g. LoRA trigger words); returns how many were new to the vocabulary.

        New ids follow the vocabulary (49408, 49409, ...), as in transformers; the text encoder's
        token embedding must grow to match. Non-special tokens are matched in lowercased text.
        """
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        added = 0
        for content in tokens:
            if not content:
                raise ValueError("cannot add an empty token")
            if content not in self.encoder:
                self.encoder[content] = len(self.encoder)
                added += 1
            self._add(AddedToken(content, special=special_tokens, normalized=not special_tokens))
        self._refresh_patterns()
        return added

    def _add(self, token: AddedToken):
        if token.content in self.added_tokens and self.added_tokens[token.content].special:
            return  # a special token stays special (and raw-matched)
        self.added_tokens[token.content] = token

    def _refresh_patterns(self):
        raw = [t.content for t in self.added_tokens.values() if not t.normalized and t.content in self.encoder]
        cleaned = [clean_text(t.content) for t in self.added_tokens.values() if t.normalized and t.content in self.encoder]
        self._normalized_ids = {clean_text(t.content): self.encoder[t.content]
                                for t in self.added_tokens.values() if t.normalized and t.content in self.encoder}
        self._raw_pattern = _leftmost_longest(raw)
        self._cleaned_pattern = _leftmost_longest(cleaned)
        self._cache.clear()

    # ------------------------------------------------------------------ encoding
    def bpe(self, word: str) -> list[str]:
        """BPE symbols of one pre-token (already byte-level mapped); the last carries '</w>'."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def _encode_cleaned(self, text: str) -> list[int]:
        ids = []
        for piece, is_token in _split(text, self._cleaned_pattern):
            if is_token:
                ids.append(self._normalized_ids[piece])
                continue
            for word in (w for clip_word in CLIP_PATTERN.findall(piece) for w in GPT2_PATTERN.findall(clip_word)):
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                unk = self.encoder.get(self.unk_token)
                ids.extend(self.encoder.get(symbol, unk) for symbol in self.bpe(mapped))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` without truncation or padding."""
        if not isinstance(text, str):
            raise TypeError(f"expected a prompt string, got {type(text).__name__}")
        ids = []
        for piece, is_token in _split(text, self._raw_pattern):
            ids.extend([self.encoder[piece]] if is_token else self._encode_cleaned(clean_text(piece)))
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def tokenize(self, text: str) -> list[str]:
        decoder = self.decoder
        return [decoder[i] for i in self.encode(text, add_special_tokens=False)]

    def __call__(self, prompts, max_length: int | None = None, padding: str = "max_length",
                 truncation: bool = True) -> dict[str, np.ndarray]:
        """``{"input_ids", "attention_mask"}`` as int32 (B, max_length), like ``padding="max_length"``.

        ``padding="longest"`` pads to the longest prompt instead (for tests and inspection).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = self.model_max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for <|startoftext|> and <|endoftext|>")
        rows = []
        for prompt in prompts:
            body = self.encode(prompt, add_special_tokens=False)
            if truncation:
                body = body[:max_length - 2]
            rows.append([self.bos_token_id, *body, self.eos_token_id])
        if padding == "max_length":
            width = max_length
        elif padding == "longest":
            width = max((len(r) for r in rows), default=0)
        else:
            raise ValueError(f"padding={padding!r}; expected 'max_length' or 'longest'")
        if any(len(r) > width for r in rows):
            raise ValueError(f"a prompt has {max(len(r) for r in rows)} tokens > {width}: pass truncation=True")
        ids = np.full((len(rows), width), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: bytes of BPE tokens joined, '</w>' read as a space, added tokens verbatim."""
        decoder = self.decoder
        parts, pending = [], bytearray()
        for i in ids:
            token = decoder[int(i)]
            added = self.added_tokens.get(token)
            if added is not None and added.special and skip_special_tokens:
                continue
            if added is not None:
                parts.extend([pending.decode("utf-8", errors="replace"), f" {token} "])
                pending = bytearray()
            else:
                pending.extend(self.byte_decoder[c] for c in token)
        parts.append(pending.decode("utf-8", errors="replace"))
        return " ".join("".join(parts).replace(END_OF_WORD, " ").split())

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder):
        """Write vocab.json, merges.txt and tokenizer_config.json (added tokens included)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        base = {t: i for t, i in self.encoder.items() if i < self.base_vocab_size}
        (folder / "vocab.json").write_text(json.dumps(base, ensure_ascii=False), encoding="utf-8")
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                           encoding="utf-8")
        decoder = {str(self.encoder[t]): {"content": t, "special": a.special, "normalized": a.normalized,
                                          "lstrip": False, "rstrip": False, "single_word": False}
                   for t, a in sorted(self.added_tokens.items(), key=lambda kv: self.encoder[kv[0]])}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                  "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "unk_token": self.unk_token, "added_tokens_decoder": decoder}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")


def read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{line_number}: expected two symbols per merge, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _leftmost_longest(tokens):
    """A pattern finding the leftmost, then longest, occurrence of any token (as Aho-Corasick does)."""
    tokens = sorted(set(tokens), key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None


def _split(text: str, pattern):
    """``(piece, is_token)`` pairs: ``text`` cut around the matches of ``pattern``."""
    if pattern is None:
        return [(text, False)] if text else []
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            pieces.append((text[start:match.start()], False))
        pieces.append((match.group(), True))
        start = match.end()
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def write_tokenizer_folder_from_openai_bpe(bpe_path, folder, *, pad_token="<|endoftext|>", model_max_length=77):
    """Make a CLIPTokenizer folder from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (open_clip ships it).

    The vocabulary is built exactly as CLIP builds it: the 256 byte characters, the same with
    '</w>', the 48,894 merges joined, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408).
    """
    import gzip

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    return write_bpe_folder(merges, folder, pad_token=pad_token, model_max_length=model_max_length)


def write_bpe_folder(merges, folder, *, pad_token="<|endoftext|>", model_max_length=77) -> Path:
    """A CLIPTokenizer folder for ``merges`` in CLIP's vocabulary layout: the 256 byte characters, the
    same with '</w>', one symbol per merge, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def openai_bpe_path() -> Path | None:
    """open_clip's copy of the CLIP merges file, found without importing open_clip (or torch)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None
