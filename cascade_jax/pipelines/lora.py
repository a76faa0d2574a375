"""LoRA files in use: load them onto Stage C (and their token rows onto the text encoder), and
give a pipeline its LoRAs merged for full-speed sampling.

``FILE[:STRENGTH]`` is the spelling of the command-line flags (``--lora``): a trailing ``:number`` is the
strength. A file whose own name ends in ``:number`` (``x:2``) is written with its strength, ``x:2:1``.
Strength scales a LoRA's weight deltas and its token-row deltas alike, so strength 0 is the same as no LoRA
(new tokens then keep their initial rows); it must be finite and within +-``MAX_STRENGTH``, checked
before any model loads. The pipeline keeps its base weights: loading another set of LoRAs starts again
from them, never by subtracting.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from flax import nnx

from cascade_jax import storage
from cascade_jax.models.lora import check_strength, merged_model, shallow_copy
from cascade_jax.models.lora_tokens import attach_token_rows, resolve_token_ids, token_embedding
from cascade_jax.weights.lora_files import load_lora
from cascade_jax.weights.lora_weights import LoRAWeights, attach_lora


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    path: str
    strength: float = 1.0

    def __post_init__(self):
        if not str(self.path):
            raise ValueError("a LoRA's path is empty: write FILE or FILE:STRENGTH")
        object.__setattr__(self, "strength", check_strength(f"LoRA {self.path} strength", self.strength))


def parse_lora_spec(spec) -> LoRASpec:
    """``"FILE"``, ``"FILE:STRENGTH"`` (a trailing ``:number``), a (path, strength) pair, or a LoRASpec.
    Refused by name: an empty path (``":0.5"``), an empty strength (``"FILE:"``), and a strength that is
    not finite or beyond +-MAX_STRENGTH (``"FILE:nan"``, ``"FILE:1e30"``)."""
    if isinstance(spec, LoRASpec):
        return spec
    if isinstance(spec, (tuple, list)):
        path, strength = spec
        return LoRASpec(str(path), strength)
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and not tail.strip():
        raise ValueError(f"--lora {text!r}: the strength after ':' is empty; write FILE or FILE:STRENGTH")
    if sep and head:
        try:
            strength = float(tail)
        except ValueError:
            return LoRASpec(text, 1.0)  # a ':' that is part of the path (C:/x, x:y)
        return LoRASpec(head, strength)
    if sep:
        raise ValueError(f"--lora {text!r}: the LoRA's path before ':' is empty; write FILE or FILE:STRENGTH")
    return LoRASpec(text, 1.0)


def check_lora_files(specs) -> list[LoRASpec]:
    """Parse ``specs`` and check that each file exists, before any model loads; a missing ``x`` read from
    ``x:2`` when a file ``x:2`` exists is explained (write ``x:2:1``)."""
    specs = [parse_lora_spec(s) for s in specs]
    for spec in specs:
        if storage.is_url(spec.path) and storage.isfile(spec.path):  # an object in a bucket
            continue
        path = Path(spec.path)
        if path.is_file():
            continue
        what = "is a folder, not a LoRA file" if path.is_dir() else "does not exist"
        literal = f"{spec.path}:{spec.strength:g}"
        hint = f" ('{literal}' is read as file {spec.path} at strength {spec.strength:g}; for the file named " \
               f"{literal} write {literal}:1)" if Path(literal).is_file() else ""
        raise FileNotFoundError(f"LoRA file {spec.path} {what}{hint}")
    return specs


def apply_lora_file(stage_c, spec, name: str, *, text_encoder=None, tokenizer=None, train_tokens=None) -> LoRAWeights:
    """Attach one LoRA file to ``stage_c`` under ``name`` (and its token rows to the text encoder,
    adding its new tokens to ``tokenizer``). ``train_tokens`` is needed only for official files
    with new tokens (they do not name them)."""
    spec, = check_lora_files([spec])
    lora = load_lora(spec.path, stage_c)
    attach_lora(stage_c, name, lora, spec.strength)
    if lora.tokens is not None:
        if text_encoder is None or tokenizer is None:
            raise ValueError(f"{spec.path} trains {len(lora.tokens.indices)} token rows: pass the text encoder "
                             "and tokenizer too")
        embedding = token_embedding(text_encoder)
        ids = resolve_token_ids(tokenizer, embedding, lora.tokens, train_tokens or lora.train_tokens,
                                getattr(tokenizer, "base_vocab_size", None))
        attach_token_rows(embedding, name, dataclasses.replace(lora.tokens, indices=ids), spec.strength)
    return lora


@dataclasses.dataclass(frozen=True)
class AppliedLoRA:
    """A LoRA a pipeline samples with: what it changed (for the user to see)."""

    path: str
    strength: float
    weights: int  # Stage C weights it adapts
    token_rows: int = 0  # text-encoder token rows it changes
    new_tokens: tuple = ()  # tokens it added to the tokenizer (usable in prompts)

    def describe(self) -> str:
        text = f"LoRA {self.path} at strength {self.strength:g}: {self.weights} Stage C weights"
        if self.token_rows:
            text += f", {self.token_rows} token rows"
            text += f"; new tokens for prompts: {' '.join(self.new_tokens)}" if self.new_tokens else ""
        return text


def apply_loras(pipe, specs) -> list[AppliedLoRA]:
    """Give ``pipe`` (a StableCascadePipeline) these LoRAs, merged; an empty list restores the base.
    Returns (and keeps as ``pipe.loras``) what each LoRA applied."""
    specs = check_lora_files(specs)
    if getattr(pipe, "_lora_base", None) is None:
        pipe._lora_base = (shallow_copy(nnx.merge(pipe.prior.graphdef, pipe.prior.state)), pipe.text.text_encoder,
                           copy.deepcopy(pipe.text.tokenizer))
    base_c, base_text, base_tokenizer = pipe._lora_base
    stage_c, text_encoder, tokenizer = shallow_copy(base_c), shallow_copy(base_text), copy.deepcopy(base_tokenizer)
    applied = []
    for i, spec in enumerate(specs):
        vocab = len(tokenizer)
        lora = apply_lora_file(stage_c, spec, f"lora_{i}", text_encoder=text_encoder, tokenizer=tokenizer)
        new_tokens = tuple(tokenizer.decoder[i] for i in range(vocab, len(tokenizer)))
        rows = 0 if lora.tokens is None else len(lora.tokens.indices)
        applied.append(AppliedLoRA(spec.path, spec.strength, len(lora.layers), rows, new_tokens))
    pipe.prior = pipe.prior.with_model(merged_model(stage_c))  # the same mesh and rules
    pipe.text.tokenizer = tokenizer
    pipe.text.set_text_encoder(merged_model(text_encoder))
    pipe.loras = applied
    return applied
