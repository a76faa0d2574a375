"""StableCascadePipeline.from_pretrained: official safetensors folders (tiny architectures via
``configs='tiny'``), converted directories, the conversion cache, missing files and offline repository ids.

Every component is a tiny random model (configs/pipelines/tiny.yaml; the EfficientNet encoder is left
out: it is optional and the largest). A load is checked by comparing every loaded array with the
model it was written from, bit for bit (float32 throughout), so no sampling program is compiled here.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from cascade_jax.models.random_init import random_model
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline, loading
from cascade_jax.pipelines.defaults import write_sampling_defaults
from cascade_jax.weights import checkpoint
from cascade_jax.weights.convert import ConversionError
from cascade_jax.weights.export import export_official
from cascade_jax.weights.tree import named_variables

COMPONENTS = ("stage_c", "stage_b", "stage_a", "text_encoder", "image_encoder", "previewer")
HF_CONFIG_EXTRAS = {  # what transformers writes beside the architecture (the loader must ignore it)
    "text_encoder": {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
                     "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 0, "pad_token_id": 1,
                     "torch_dtype": "float32", "transformers_version": "5.24.0"},
    "image_encoder": {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                      "num_channels": 3, "attention_dropout": 0.0, "torch_dtype": "float32"},
}


def arrays_of(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in named_variables(model).items()}


def assert_same_weights(loaded, reference, name):
    got, want = arrays_of(loaded), arrays_of(reference)
    assert sorted(got) == sorted(want), f"{name}: different variables"
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{component: (model name, config, random model, converted directory)}."""
    tiny_set = loading.pipeline_set("tiny")
    root = tmp_path_factory.mktemp("converted_models")
    parts = {}
    for i, component in enumerate(COMPONENTS):
        model_name, config = tiny_set[component]
        model = random_model(model_name, config, seed=10 + i)
        folder = root / component
        checkpoint.save(folder, {"model": model_name, "config": config, "dtype": "float32"}, arrays_of(model))
        parts[component] = (model_name, config, model, folder)
    return parts


@pytest.fixture(scope="module")
def tokenizer_dir():
    return loading.default_tokenizer_dir()


@pytest.fixture(scope="module")
def official_folder(tiny, tokenizer_dir, tmp_path_factory):
    """The layout of the stabilityai/stable-cascade download: official single files for the stages and
    the previewer, transformers folders (model.safetensors + config.json) for the CLIP encoders."""
    root = tmp_path_factory.mktemp("official")
    for component, (_, config, _, converted) in tiny.items():
        if component in loading.DIFFUSERS_FOLDERS and component not in loading.OFFICIAL_FILES:
            folder = root / loading.DIFFUSERS_FOLDERS[component]
            folder.mkdir()
            export_official(converted, folder / "model.safetensors")
            (folder / "config.json").write_text(json.dumps({**HF_CONFIG_EXTRAS[component], **config}))
        else:
            export_official(converted, root / loading.official_candidates(component, False, "float32")[0])
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(folder))
    return folder


def count_conversions(monkeypatch) -> list:
    calls = []
    real = loading.convert_checkpoint

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loading, "convert_checkpoint", counting)
    return calls


def text_encoder_of(pipe):
    return nnx.merge(pipe.text._graphdef, pipe.text._state)


def check_pipeline(pipe, tiny):
    assert_same_weights(nnx.merge(pipe.prior.graphdef, pipe.prior.state), tiny["stage_c"][2], "stage_c")
    assert_same_weights(nnx.merge(pipe.decoder.graphdef, pipe.decoder.state), tiny["stage_b"][2], "stage_b")
    for component in ("stage_a", "image_encoder", "previewer"):
        assert_same_weights(getattr(pipe, component), tiny[component][2], component)
    assert_same_weights(text_encoder_of(pipe), tiny["text_encoder"][2], "text_encoder")
    assert pipe.effnet is None  # optional and absent
    assert pipe.text.tokenizer("a cat")["input_ids"].shape == (1, 77)


def test_official_folder_with_tiny_configs_converts_once(official_folder, tiny, cache, monkeypatch):
    conversions = count_conversions(monkeypatch)
    pipe = StableCascadePipeline.from_pretrained(official_folder, configs="tiny", dtype="float32")
    check_pipeline(pipe, tiny)
    assert sorted(conversions) == sorted(["stage_c", "stage_b", "stage_a", "clip_text", "clip_vision", "previewer"])
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 6  # .locks/ aside

    conversions.clear()  # (c) the second load reads the cache: no conversion at all
    check_pipeline(StableCascadePipeline.from_pretrained(official_folder, configs="tiny", dtype="float32"), tiny)
    assert conversions == []

    # The cache is keyed on content: a touched file is still the same entry, but another file of the same
    # size and modification time is converted again; the others still come from the cache.
    stage_a = official_folder / "stage_a.safetensors"
    stat, original = stage_a.stat(), stage_a.read_bytes()
    os.utime(stage_a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    check_pipeline(StableCascadePipeline.from_pretrained(official_folder, configs="tiny", dtype="float32"), tiny)
    assert conversions == []
    model_name, config, _, _ = tiny["stage_a"]
    other = random_model(model_name, config, seed=99)
    checkpoint.save(cache.parent / "other_a", {"model": model_name, "config": config, "dtype": "float32"},
                    arrays_of(other))
    try:
        export_official(cache.parent / "other_a", stage_a)
        assert stage_a.stat().st_size == stat.st_size
        os.utime(stage_a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        pipe = StableCascadePipeline.from_pretrained(official_folder, configs="tiny", dtype="float32")
        assert conversions == ["stage_a"]
        assert_same_weights(pipe.stage_a, other, "replaced stage_a")
    finally:
        stage_a.write_bytes(original)


def test_official_files_need_matching_configs(official_folder, cache):
    # Without configs='tiny' the full-size presets apply, and the error says how to fix it.
    with pytest.raises(ConversionError, match=r"(?s)stage_c.*configs='tiny'"):
        StableCascadePipeline.from_pretrained(official_folder, dtype="float32")
    with pytest.raises(ValueError, match="unknown pipeline set 'nope'"):
        StableCascadePipeline.from_pretrained(official_folder, configs="nope")


def test_converted_directories_load_directly(tiny, tokenizer_dir, tmp_path, cache, monkeypatch):
    root = tmp_path / "weights"
    for component, (_, _, _, converted) in tiny.items():
        shutil.copytree(converted, root / component)
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    conversions = count_conversions(monkeypatch)
    check_pipeline(StableCascadePipeline.from_pretrained(root, dtype="float32"), tiny)  # no configs needed
    assert conversions == [] and not cache.exists()


def test_sampling_json_sets_the_pipelines_default_settings(tiny, tokenizer_dir, tmp_path, cache):
    root = tmp_path / "weights"
    for component, (_, _, _, converted) in tiny.items():
        shutil.copytree(converted, root / component)
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    pipe = StableCascadePipeline.from_pretrained(root, dtype="float32")
    assert (pipe.prior_defaults, pipe.decoder_defaults) == (PRIOR_DEFAULTS, DECODER_DEFAULTS)  # no file: official

    write_sampling_defaults(root, {"prior": {"steps": 2}, "decoder": {"steps": 2, "t_start": 0.9, "cfg": [3, 1]}})
    pipe = StableCascadePipeline.from_pretrained(root, dtype="float32")
    assert pipe.prior_defaults == PRIOR_DEFAULTS.replace(steps=2)
    assert pipe.decoder_defaults == DECODER_DEFAULTS.replace(steps=2, t_start=0.9, cfg=(3, 1))
    plain = pipe.text_to_image("a cat", height=128, width=128, seed=3)  # no settings given: the file's
    given = pipe.text_to_image("a cat", height=128, width=128, seed=3, prior=pipe.prior_defaults,
                               decoder=pipe.decoder_defaults)
    official = pipe.text_to_image("a cat", height=128, width=128, seed=3, prior=pipe.prior_defaults,
                                  decoder=DECODER_DEFAULTS.replace(steps=2))
    np.testing.assert_array_equal(plain.stage_b_latents, given.stage_b_latents)
    assert not np.allclose(plain.stage_b_latents, official.stage_b_latents)

    for text, message in (("{", "sampling.json: not readable JSON"),
                          ('{"decodr": {}}', "unknown stage 'decodr' \\(did you mean 'decoder'\\?\\)"),
                          ('{"decoder": {"t_strat": 0.9}}',
                           "unknown decoder setting 't_strat' \\(did you mean 't_start'"),
                          ('{"prior": {"t_start": 2}}', "sampling.json: prior: t_start"),
                          ('{"prior": 3}', "'prior' must be an object")):
        (root / "sampling.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            StableCascadePipeline.from_pretrained(root, dtype="float32")


def test_precision_variants_in_a_transformers_folder(official_folder, tiny, tmp_path, cache):
    """diffusers-style downloads carry model.safetensors and model.bf16.safetensors side by side."""
    root = tmp_path / "variants"
    shutil.copytree(official_folder, root)
    (root / "text_encoder" / "model.bf16.safetensors").write_bytes(b"not read")
    model_name, config, reference, _ = tiny["text_encoder"]
    loaded = loading.load_component(root, "text_encoder", model_name, config, lite=False, dtype="float32",
                                    required=True)
    assert_same_weights(loaded, reference, "text_encoder")


def test_missing_components_name_the_files(official_folder, tmp_path, cache):
    root = tmp_path / "incomplete"
    shutil.copytree(official_folder, root)
    (root / "stage_b.safetensors").unlink()
    shutil.rmtree(root / "text_encoder")
    with pytest.raises(FileNotFoundError) as info:
        StableCascadePipeline.from_pretrained(root, configs="tiny", dtype="float32")
    message = str(info.value)
    for name in ("no weights for stage_b", "stage_b_bf16.safetensors", "stage_b.safetensors", "decoder/",
                 "no weights for text_encoder", "text_encoder/", "stabilityai/stable-cascade"):
        assert name in message, message
    assert not cache.exists()  # nothing was converted before the error
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
        StableCascadePipeline.from_pretrained(root, configs="tiny", dtype="float32")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        StableCascadePipeline.from_pretrained(tmp_path / "does-not-exist")


def test_repository_id_offline_gives_clear_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(FileNotFoundError) as info:
        StableCascadePipeline.from_pretrained("stabilityai/stable-cascade", dtype="float32")
    message = str(info.value)
    assert "could not download stabilityai/stable-cascade" in message and "Offline?" in message
    assert "huggingface-cli download stabilityai/stable-cascade" in message


def test_float16_is_refused_before_loading(official_folder, cache):
    with pytest.raises(ValueError, match="float16 is not supported"):
        StableCascadePipeline.from_pretrained(official_folder, configs="tiny", dtype="float16")
    assert not cache.exists()


# The layout of stabilityai/stable-cascade (abridged): both precisions and variants of every stage.
HUB_LISTING = [
    "README.md", "model_index.json", "stage_a.safetensors", "effnet_encoder.safetensors", "previewer.safetensors",
    *(f"stage_{s}{lite}{bf16}.safetensors" for s in "bc" for lite in ("", "_lite") for bf16 in ("", "_bf16")),
    "comfyui_checkpoints/stable_cascade_stage_c.safetensors", "controlnet/canny.safetensors",
    "decoder/config.json", "decoder/diffusion_pytorch_model.bf16.safetensors",
    "decoder/diffusion_pytorch_model.safetensors", "vqgan/config.json", "vqgan/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.bf16.safetensors", "text_encoder/model.safetensors",
    "image_encoder/config.json", "image_encoder/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
]


@pytest.mark.parametrize("lite, dtype, stage_files, text_weights", [
    (False, "bfloat16", ["stage_b_bf16.safetensors", "stage_c_bf16.safetensors"], "model.bf16.safetensors"),
    (True, "float32", ["stage_b_lite.safetensors", "stage_c_lite.safetensors"], "model.safetensors"),
])
def test_hub_download_fetches_only_the_chosen_variant_and_dtype(monkeypatch, tmp_path, lite, dtype, stage_files,
                                                                text_weights):
    import huggingface_hub

    calls = {}

    def snapshot(repo_id, allow_patterns=None, **kwargs):
        calls["allow_patterns"] = allow_patterns
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: list(HUB_LISTING))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    presets = loading.pipeline_set("tiny")
    assert loading.resolve_source("stabilityai/stable-cascade", presets, lite=lite, dtype=dtype) == tmp_path
    expected = sorted(stage_files + ["stage_a.safetensors", "effnet_encoder.safetensors", "previewer.safetensors",
                                     "text_encoder/config.json", f"text_encoder/{text_weights}",
                                     "image_encoder/config.json", "image_encoder/model.safetensors",
                                     "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json"])
    assert calls["allow_patterns"] == expected
