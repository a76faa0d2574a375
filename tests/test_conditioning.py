"""TextConditioner: prompts -> Stage C/B text inputs, against transformers' tokenizer + text model.

Reference: what Stable Cascade's official code does, with transformers: tokenize with
truncation and padding="max_length" (77), run CLIPTextModelWithProjection with the attention
mask and output_hidden_states=True; clip_text = hidden_states[-1], clip_text_pooled =
text_embeds[:, None]. Bound: max|Δ| ≤ 1e-4·max|ref| (helpers.relative_error).
"""

import copy

import numpy as np
import pytest

from cascade_jax.conditioning import PromptTruncatedWarning, TextConditioner, bucket_size
from cascade_jax.models.clip import text_kwargs_from_hf_config
from cascade_jax.data.clip_tokenizer import CLIPTokenizer, openai_bpe_path, write_tokenizer_folder_from_openai_bpe

from clip_testing import load_converted, randomise_torch_model, save_torch_model
from helpers import relative_error

TOL = 1e-4
PROMPTS = ["a photo of a cat", "", "An astronaut riding a horse, highly detailed, 8k!",
           " ".join(["long"] * 90)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    bpe = openai_bpe_path()
    if bpe is None:
        pytest.skip("open_clip_torch is not installed: it ships the CLIP merges file the tokenizer is built from")
    tmp = tmp_path_factory.mktemp("conditioning")
    folder = write_tokenizer_folder_from_openai_bpe(bpe, tmp / "tokenizer", pad_token="!")  # as SDXL/bigG folders
    hf_config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=48, projection_dim=24,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                            hidden_act="gelu", eos_token_id=49407)
    torch.manual_seed(0)
    ref = randomise_torch_model(transformers.CLIPTextModelWithProjection(hf_config), seed=5)
    weights = save_torch_model(ref, tmp / "model.safetensors")
    model = load_converted("clip_text", text_kwargs_from_hf_config(hf_config.to_dict()), weights, tmp)
    return {"ref": ref, "ref_tokenizer": transformers.CLIPTokenizer.from_pretrained(str(folder)),
            "model": model, "tokenizer": CLIPTokenizer.from_pretrained(folder)}


def reference(setup, prompts):
    import torch

    tokens = setup["ref_tokenizer"](prompts, truncation=True, padding="max_length", max_length=77,
                                    return_tensors="pt")
    with torch.no_grad():
        out = setup["ref"](**tokens, output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.text_embeds[:, None].numpy()


def test_matches_official_recipe_with_transformers(setup):
    conditioner = TextConditioner(setup["model"], setup["tokenizer"])
    with pytest.warns(PromptTruncatedWarning, match="prompt 3 .* has 90 tokens"):  # truncated as transformers does
        got = conditioner(PROMPTS)
    want_text, want_pooled = reference(setup, PROMPTS)
    assert got.clip_text.shape == (4, 77, 32) and got.clip_text_pooled.shape == (4, 1, 24)
    errors = (relative_error(got.clip_text, want_text), relative_error(got.clip_text_pooled, want_pooled))
    print(f"conditioning: clip_text {errors[0]:.2e}, clip_text_pooled {errors[1]:.2e}")
    assert max(errors) <= TOL
    assert got.stage_b()["clip"] is got.clip_text_pooled
    assert set(got.stage_c()) == {"clip_text", "clip_text_pooled"}
    notes = conditioner.truncation_notes(PROMPTS, ["a", "b", "c", "the long one"])  # the warning, for a web page
    assert len(notes) == 1 and notes[0].startswith("the long one ('long long") and \
        "has 90 tokens; CLIP reads the first 75, the rest is ignored" in notes[0], notes


def test_cache_and_unconditional(setup):
    conditioner = TextConditioner(setup["model"], setup["tokenizer"], cache_size=3)
    first = conditioner(["a cat", "a dog", "a cat"])
    assert conditioner.cache_info() == {"hits": 1, "misses": 2, "size": 2, "max_size": 3}
    cond, uncond = conditioner.with_unconditional(["a dog", "a cat"])
    assert conditioner.cache_info()["misses"] == 3  # only "" was new (encoded once for both rows)
    np.testing.assert_array_equal(cond.clip_text[0], first.clip_text[1])
    want_text, want_pooled = reference(setup, ["", ""])
    assert relative_error(uncond.clip_text, want_text) <= TOL
    assert relative_error(uncond.clip_text_pooled, want_pooled) <= TOL
    # Equal whatever batch it was encoded in (rows are padded to a power of two).
    alone = TextConditioner(setup["model"], setup["tokenizer"])("a dog")
    assert relative_error(alone.clip_text[0], first.clip_text[1]) <= 1e-6
    # LRU: a fourth distinct encoding evicts the least recently used ("a dog" was used before "a cat").
    conditioner(["a bird"])
    assert conditioner.cache_info()["size"] == 3
    misses = conditioner.cache_info()["misses"]
    conditioner(["a cat", ""])
    assert conditioner.cache_info()["misses"] == misses
    conditioner(["a dog"])
    assert conditioner.cache_info()["misses"] == misses + 1
    negative, _ = conditioner.with_unconditional(["a bird"], negative_prompts="blurry")
    assert negative.clip_text.shape == (1, 77, 32)


def test_bucket_sizes():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_vocabulary_mismatch_is_named(setup):
    grown = copy.deepcopy(setup["tokenizer"])
    grown.add_tokens(["<new-token>"])
    with pytest.raises(ValueError, match="token_embedding"):
        TextConditioner(setup["model"], grown)
