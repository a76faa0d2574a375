"""CLIPTextEncoder: parity with transformers' CLIPTextModelWithProjection, full-size layout.

Parity bound: max|Δ| ≤ 1e-4·max|ref| (helpers.relative_error) at tiny random configs in float32,
every parameter randomised (LayerNorm weights included), ``.eval()``.
"""


import numpy as np
import pytest
from flax import nnx

from cascade_jax.models.clip import CLIPTextEncoder, end_of_text_positions, text_kwargs_from_hf_config
from cascade_jax.weights.tree import expected_torch_shapes

from helpers import relative_error
from clip_testing import load_converted, randomise_torch_model, save_torch_model

TOL = 1e-4
VOCAB, T = 1000, 16
BOS, EOS = VOCAB - 2, VOCAB - 1


forward = nnx.jit(lambda model, ids, mask: model(ids, mask, output_hidden_states=True))


def tiny_config(**overrides):
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, projection_dim=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=T, hidden_act="gelu", layer_norm_eps=1e-5,
                  eos_token_id=EOS)
    config.update(overrides)
    return config


def token_batch(pad_id, seed=0):
    """Tokenizer-like rows: bos, words, eos, then pad (full, medium, empty prompt, one long row)."""
    rng = np.random.default_rng(seed)
    ids = np.full((4, T), pad_id, np.int64)
    mask = np.zeros((4, T), np.int64)
    for row, n_words in enumerate([5, 9, 0, T - 2]):
        words = rng.integers(1, VOCAB - 3, n_words)
        seq = [BOS, *words, EOS]
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return ids, mask


def build_pair(config, tmp_path, attn_implementation="sdpa", seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPTextConfig(**config, bos_token_id=BOS, pad_token_id=1,
                                            attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    ref = randomise_torch_model(transformers.CLIPTextModelWithProjection(hf_config), seed)
    weights = save_torch_model(ref, tmp_path / "clip_text.safetensors")
    ours = load_converted("clip_text", text_kwargs_from_hf_config(hf_config.to_dict()), weights, tmp_path)
    return ref, ours


def run_reference(ref, ids, mask):
    import torch

    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                  output_hidden_states=True)
    return {"pre_norm": out.hidden_states[-1].numpy(), "last": out.last_hidden_state.numpy(),
            "text_embeds": out.text_embeds.numpy(), "hidden_states": [h.numpy() for h in out.hidden_states]}


def compare(ours, ref, ids, mask, label):
    want = run_reference(ref, ids, mask)
    got = forward(ours, ids, mask)
    errors = {
        "pre_norm": relative_error(got.last_hidden_state_pre_norm, want["pre_norm"]),
        "last": relative_error(got.last_hidden_state, want["last"]),
        "text_embeds": relative_error(got.text_embeds, want["text_embeds"]),
        "hidden_states": max(relative_error(g, w) for g, w in zip(got.hidden_states, want["hidden_states"])),
    }
    print(f"{label}: relative errors {errors}")
    assert len(got.hidden_states) == len(want["hidden_states"])
    for name, err in errors.items():
        assert err <= TOL, f"{label} {name}: {err:.2e} > {TOL}"


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_parity_with_padding_mask(tmp_path, hidden_act):
    ref, ours = build_pair(tiny_config(hidden_act=hidden_act), tmp_path)
    for pad_id, label in [(EOS, "pad=eos"), (0, "pad=0 ('!')")]:
        ids, mask = token_batch(pad_id)
        compare(ours, ref, ids, mask, f"{hidden_act} {label} masked")
        compare(ours, ref, ids, None, f"{hidden_act} {label} unmasked")


def test_parity_eager_attention_and_legacy_eos(tmp_path):
    # eos_token_id == 2: transformers pools at the argmax of the ids (configs before PR #24773).
    ref, ours = build_pair(tiny_config(eos_token_id=2), tmp_path, attn_implementation="eager", seed=1)
    ids, mask = token_batch(0, seed=1)
    compare(ours, ref, ids, mask, "eager, legacy eos_token_id=2")
    # Leading masked positions leave their queries no key: like eager attention, we attend
    # uniformly there (torch's sdpa gives another value at those positions only; a tokenizer
    # never masks position 0).
    mask[:, 0] = 0
    mask[1, :3] = 0
    compare(ours, ref, ids, mask, "eager, fully masked query rows")


def test_end_of_text_position_rules():
    ids = np.array([[BOS, 5, EOS, EOS, EOS], [BOS, 7, 9, EOS, 0], [BOS, VOCAB + 3, EOS, 0, 0], [BOS, 4, 4, 4, 4]])
    np.testing.assert_array_equal(end_of_text_positions(ids, EOS), [2, 3, 2, 0])  # first eos; none -> 0
    np.testing.assert_array_equal(end_of_text_positions(ids, 2), [2, 3, 1, 0])  # legacy: argmax id


def test_hf_config_filter():
    config = {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 32, "attention_dropout": 0.0,
              "bos_token_id": 0, "eos_token_id": 2, "torch_dtype": "float32", "projection_dim": 16}
    assert text_kwargs_from_hf_config(config) == {"hidden_size": 32, "eos_token_id": 2, "projection_dim": 16}
    assert text_kwargs_from_hf_config({"text_config": {"hidden_size": 8}, "vision_config": {}}) == {"hidden_size": 8}


def test_bad_inputs_are_named():
    model = nnx.eval_shape(lambda: CLIPTextEncoder(**tiny_config(num_hidden_layers=1), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, T + 1), np.int32))
    with pytest.raises(ValueError, match="batch, length"):
        model(np.zeros((T,), np.int32))


def test_resize_token_embeddings_for_new_tokens():
    model = CLIPTextEncoder(**tiny_config(num_hidden_layers=1), rngs=nnx.Rngs(0))
    old = np.asarray(model.text_model.embeddings.token_embedding.weight[...])
    model.resize_token_embeddings(VOCAB + 2, copy_from=[7, 9])
    new = np.asarray(model.text_model.embeddings.token_embedding.weight[...])
    np.testing.assert_array_equal(new[:VOCAB], old)
    np.testing.assert_array_equal(new[VOCAB:], old[[7, 9]])
    model.resize_token_embeddings(VOCAB + 3)
    np.testing.assert_allclose(model.text_model.embeddings.token_embedding.weight[...][-1], new.mean(0), atol=1e-8)
    ids = np.array([[BOS, VOCAB, VOCAB + 1, EOS] + [EOS] * (T - 4)])
    assert model(ids).text_embeds.shape == (1, 48)
    assert expected_torch_shapes(model)["text_model.embeddings.token_embedding.weight"] == (VOCAB + 3, 64)
    with pytest.raises(ValueError, match="shrinking"):
        model.resize_token_embeddings(VOCAB)
