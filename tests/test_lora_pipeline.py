"""LoRAs in the pipeline: a LoRA with a new token on the tiny random cascade (API and script flag)."""

from __future__ import annotations

import copy
import dataclasses
import types

import jax
import numpy as np
import pytest
from flax import nnx

from cascade_jax.models import lora as L
from cascade_jax.models.lora_tokens import add_train_tokens, token_embedding
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline
from cascade_jax.pipelines.lora import parse_lora_spec
from cascade_jax.weights.lora_files import save_official

TRAIN_TOKENS = [("[fernando]", "^dog</w>")]
PRIOR = dataclasses.replace(PRIOR_DEFAULTS, steps=2)
DECODER = dataclasses.replace(DECODER_DEFAULTS, steps=2)


@pytest.fixture(scope="module")
def pipe():
    try:
        return StableCascadePipeline.random("tiny")
    except FileNotFoundError as e:  # no CLIP BPE file (open_clip_torch) for the tokenizer
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def lora_file(pipe, tmp_path_factory):
    """A file with random attention factors and a delta on a new token initialised from 'dog'."""
    stage_c = L.shallow_copy(nnx.merge(pipe.prior.graphdef, pipe.prior.state))
    L.init_lora(stage_c, "made", rank=2, key=jax.random.key(3))
    rng = np.random.default_rng(0)
    for _, weight in L.adapted_weights(stage_c):
        down = weight.adapters["made"].lora_down
        down.set_value(rng.normal(size=down.shape).astype(np.float32) * 0.05)
    tokenizer, embedding = copy.deepcopy(pipe.text.tokenizer), token_embedding(pipe.text.text_encoder)
    ids = add_train_tokens(tokenizer, embedding, TRAIN_TOKENS)
    rows = rng.normal(size=(1, embedding.weight.shape[1])).astype(np.float32)
    lora = L.LoRAWeights(L.lora_layers(stage_c, "made"), L.TokenDeltas(np.asarray(ids), rows, ["[fernando]"]),
                         train_tokens=TRAIN_TOKENS)
    path = tmp_path_factory.mktemp("lora") / "fernando.safetensors"
    save_official(path, lora)
    return path, rows, np.asarray(embedding.weight[...])[-1]


def t2i(pipe, prompt):
    return pipe.text_to_image(prompt, height=128, width=128, prior=PRIOR, decoder=DECODER, decode=False)


def test_spec_parsing():
    assert parse_lora_spec("a/b.safetensors:0.5") == parse_lora_spec(("a/b.safetensors", 0.5))
    assert parse_lora_spec("C:/x.safetensors").strength == 1.0 and parse_lora_spec("x:y").path == "x:y"


def _stage_c_params(pipe) -> dict:
    model = nnx.merge(pipe.prior.graphdef, pipe.prior.state)
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_new_token_lora_in_the_pipeline(pipe, lora_file):
    path, rows, init_row = lora_file
    vocab, base = len(pipe.text.tokenizer), _stage_c_params(pipe)
    pipe.load_loras([f"{path}:0"])
    assert _same(_stage_c_params(pipe), base)  # strength 0 = no LoRA, to the bit
    pipe.load_loras([str(path)])
    tokenizer, table = pipe.text.tokenizer, token_embedding(pipe.text.text_encoder).weight[...]
    token_id = tokenizer.token_to_id("[fernando]")
    assert token_id == vocab and table.shape[0] == vocab + 1
    np.testing.assert_allclose(np.asarray(table[token_id]), init_row + rows[0], rtol=1e-6, atol=1e-6)
    assert tokenizer.encode("a photo of [fernando]")[-2] == token_id
    assert not _same(_stage_c_params(pipe), base)
    assert np.all(np.isfinite(t2i(pipe, "a photo of [fernando]").stage_c_latents))
    pipe.load_loras([])
    assert len(pipe.text.tokenizer) == vocab and _same(_stage_c_params(pipe), base)
    assert token_embedding(pipe.text.text_encoder).weight.shape[0] == vocab


def test_generate_script_lora_flag():
    import importlib.util

    from helpers import REPO
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "sample" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["text2img", "--random", "tiny", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors"])
    assert [parse_lora_spec(s) for s in args.lora] == [parse_lora_spec(("a.safetensors", 0.5)),
                                                       parse_lora_spec(("b.safetensors", 1.0))]
    pipe = types.SimpleNamespace(prior_defaults=PRIOR_DEFAULTS, decoder_defaults=DECODER_DEFAULTS)  # no model
    script.resolve_settings(args, pipe)
    assert script.metadata(args)["loras"] == ["a.safetensors:0.5", "b.safetensors"]
