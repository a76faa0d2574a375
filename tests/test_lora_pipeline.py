"""LoRAs in the pipeline: a LoRA with a new token on the tiny random cascade (API and script flag)."""

from __future__ import annotations

import copy
import dataclasses
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cascade_jax.models import lora as L
from cascade_jax.models.lora_tokens import add_train_tokens, token_embedding
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline
from cascade_jax.pipelines.lora import LoRASpec, check_lora_files, parse_lora_spec
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


def test_spec_parsing(tmp_path, monkeypatch):
    assert parse_lora_spec("a/b.safetensors:0.5") == parse_lora_spec(("a/b.safetensors", 0.5))
    assert parse_lora_spec("C:/x.safetensors").strength == 1.0 and parse_lora_spec("x:y").path == "x:y"
    # Refused by name, before any model loads (nan/inf made NaN images after sampling).
    for spec, message in [("style.safetensors:nan", "LoRA style.safetensors strength must be a finite number"),
                          ("style.safetensors:inf", "strength must be a finite number between -100 and 100"),
                          ("style.safetensors:1e30", "strength must be a finite number"),
                          ("style.safetensors:", "the strength after ':' is empty"),
                          (":0.5", "the LoRA's path before ':' is empty"), ("", "a LoRA's path is empty")]:
        with pytest.raises(ValueError, match=message):
            parse_lora_spec(spec)
    # A file whose own name ends in ':number' is written with its strength (the documented escape).
    monkeypatch.chdir(tmp_path)
    Path("x:2").touch()
    assert parse_lora_spec("x:2:1") == LoRASpec("x:2", 1.0) and check_lora_files(["x:2:0.5"]) == [LoRASpec("x:2", 0.5)]
    with pytest.raises(FileNotFoundError, match=r"LoRA file x does not exist \('x:2' is read as file x at strength 2; "
                                                r"for the file named x:2 write x:2:1\)"):
        check_lora_files(["x:2"])


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
    applied, = pipe.loras  # what generate.py prints
    assert applied.describe() == f"LoRA {path} at strength 1: {applied.weights} Stage C weights, 1 token rows; new " \
                                 "tokens for prompts: [fernando]" and applied.weights > 0
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


def test_generate_script_lora_flag(tmp_path, monkeypatch, capsys):
    import importlib.util

    from helpers import REPO
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "sample" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    for name in ("a.safetensors", "b.safetensors"):
        Path(name).touch()
    for lora, message in [("a.safetensors:nan", "--lora: LoRA a.safetensors strength must be a finite number"),
                          ("c.safetensors", "--lora: LoRA file c.safetensors does not exist")]:
        with pytest.raises(SystemExit):  # before any model loads
            script.parse_args(["text2img", "--random", "tiny", "--lora", lora])
        assert message in capsys.readouterr().err
    args = script.parse_args(["text2img", "--random", "tiny", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors"])
    assert [parse_lora_spec(s) for s in args.lora] == [parse_lora_spec(("a.safetensors", 0.5)),
                                                       parse_lora_spec(("b.safetensors", 1.0))]
    pipe = types.SimpleNamespace(prior_defaults=PRIOR_DEFAULTS, decoder_defaults=DECODER_DEFAULTS)  # no model
    script.resolve_settings(args, pipe)
    assert script.metadata(args)["loras"] == ["a.safetensors:0.5", "b.safetensors"]
