"""LoRA files in use: load them onto Stage C (and their token rows onto the text encoder), and
give a pipeline its LoRAs merged for full-speed sampling.

``FILE[:STRENGTH]`` is the spelling of the command-line flags (``--lora``). Strength scales a
LoRA's weight deltas and its token-row deltas alike, so strength 0 is the same as no LoRA
(new tokens then keep their initial rows). The pipeline keeps its base weights: loading another
set of LoRAs starts again from them, never by subtracting.
"""

from __future__ import annotations

import copy
import dataclasses

from flax import nnx

from cascade_jax import storage
from cascade_jax.models.lora import LoRAWeights, attach_lora, merged_model, shallow_copy
from cascade_jax.models.lora_tokens import attach_token_rows, resolve_token_ids, token_embedding
from cascade_jax.weights.lora_files import load_lora


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    path: str
    strength: float = 1.0


def parse_lora_spec(spec) -> LoRASpec:
    """``"FILE"``, ``"FILE:STRENGTH"`` (a trailing ``:number``), a (path, strength) pair, or a LoRASpec."""
    if isinstance(spec, LoRASpec):
        return spec
    if isinstance(spec, (tuple, list)):
        path, strength = spec
        return LoRASpec(str(path), float(strength))
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return LoRASpec(head, float(tail))
        except ValueError:
            pass  # a ':' that is part of the path
    return LoRASpec(text, 1.0)


def apply_lora_file(stage_c, spec, name: str, *, text_encoder=None, tokenizer=None, train_tokens=None) -> LoRAWeights:
    """Attach one LoRA file to ``stage_c`` under ``name`` (and its token rows to the text encoder,
    adding its new tokens to ``tokenizer``). ``train_tokens`` is needed only for official files
    with new tokens (they do not name them)."""
    spec = parse_lora_spec(spec)
    if not storage.isfile(spec.path):  # a local file or an object in a bucket
        raise FileNotFoundError(f"LoRA file {spec.path} does not exist")
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


def apply_loras(pipe, specs):
    """Give ``pipe`` (a StableCascadePipeline) these LoRAs, merged; an empty list restores the base."""
    specs = [parse_lora_spec(s) for s in specs]
    if getattr(pipe, "_lora_base", None) is None:
        pipe._lora_base = (shallow_copy(nnx.merge(pipe.prior.graphdef, pipe.prior.state)), pipe.text.text_encoder,
                           copy.deepcopy(pipe.text.tokenizer))
    base_c, base_text, base_tokenizer = pipe._lora_base
    stage_c, text_encoder, tokenizer = shallow_copy(base_c), shallow_copy(base_text), copy.deepcopy(base_tokenizer)
    for i, spec in enumerate(specs):
        apply_lora_file(stage_c, spec, f"lora_{i}", text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.prior = pipe.prior.with_model(merged_model(stage_c))  # the same mesh and rules
    pipe.text.tokenizer = tokenizer
    pipe.text.set_text_encoder(merged_model(text_encoder))
    pipe.loras = specs
    return pipe
