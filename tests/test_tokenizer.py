"""CLIP tokenizer parity with transformers' CLIPTokenizer built from the same folder.

The folder is made from the CLIP merges file that the ``open_clip_torch`` package ships
(``bpe_simple_vocab_16e6.txt.gz``), deriving vocab.json/merges.txt as CLIP does.
"""

import json

import numpy as np
import pytest

from cascade_jax.data.clip_tokenizer import (CLIPTokenizer, clean_text, openai_bpe_path,
                                               write_tokenizer_folder_from_openai_bpe)

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on the Moon, highly detailed, 8k, trending on artstation",
    "",
    "   ",
    "!!!???... (((masterpiece))), [best:1.2] {quality} -- ~~ @user #tag $100 50% a&b <x> 'quoted' \"dq\"",
    "it's we're they've I'm you'll he'd don't Let'S",
    "café naïve Zürich — «ÇA VA» ΟΔΟΣ Σ İstanbul straße ﬁne",
    "東京タワーの写真 한국어 텍스트 مرحبا بالعالم हिन्दी",
    "emoji 🐱‍👤🚀✨ and 2024-12-31 3.14159 ²½",
    "tabs\tand\nnewlines\r\n  and\u00a0nbsp\u3000ideographic   spaces",
    "e\u0301 combining vs \u00e9 precomposed, &amp; html stays",
    "hello! <|endoftext|> inside <|startoftext|> text",
    "x<|ENDOFTEXT|>y <|StartOfText|> z <|endoftext",  # special-token look-alikes in other cases
    " ".join(["word"] * 100),  # truncated at 77
    "antidisestablishmentarianism supercalifragilisticexpialidocious pneumonoultramicroscopic",
]


def hf_style_configs(folder):
    """The config files as transformers saves them for SDXL's / bigG's tokenizer: pad "!",
    added_tokens_decoder with per-token flags (<|startoftext|> normalised), dict-valued special tokens."""
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_prefix_space=False, do_lower_case=True, errors="replace", pad_token="!", added_tokens_decoder={
        "0": {"content": "!", "normalized": False, **flags},
        "49406": {"content": "<|startoftext|>", "normalized": True, **flags},
        "49407": {"content": "<|endoftext|>", "normalized": False, **flags}})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {name: {"content": content, "lstrip": False, "normalized": name == "bos_token", "rstrip": False,
                      "single_word": False}
               for name, content in [("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
                                     ("pad_token", "!"), ("unk_token", "<|endoftext|>")]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


@pytest.fixture(scope="module", params=["pad_eot", "pad_bang", "hf_style"])
def tokenizer_dir(request, tmp_path_factory):
    bpe = openai_bpe_path()
    if bpe is None:
        pytest.skip("open_clip_torch is not installed: it ships the CLIP merges file these tests build from")
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_tokenizer_folder_from_openai_bpe(bpe, folder, pad_token="!" if request.param == "pad_bang" else "<|endoftext|>")
    if request.param == "hf_style":
        hf_style_configs(folder)
    return folder


def reference(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def pair(tokenizer_dir):
    """(ours, transformers') loaded once per folder; tests that add tokens load their own."""
    return CLIPTokenizer.from_pretrained(tokenizer_dir), reference(tokenizer_dir)


def test_vocabulary_is_clips(pair):
    tok, _ = pair
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert tok.model_max_length == 77


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_and_mask_match_transformers(pair, prompt):
    ours, ref = pair
    got = ours([prompt])
    want = ref([prompt], padding="max_length", truncation=True, max_length=77, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"].astype(np.int32))
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"].astype(np.int32))
    assert got["input_ids"].shape == (1, 77)


def test_batch_and_untruncated_match(pair):
    ours, ref = pair
    got = ours(PROMPTS)
    want = ref(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    for prompt in PROMPTS:
        assert ours.encode(prompt) == ref(prompt)["input_ids"], prompt
    long = ours.encode(PROMPTS[13])
    assert len(long) == 102 and got["input_ids"][13, -1] == 49407  # eos kept after truncation


def test_added_tokens_match_transformers(tokenizer_dir, tmp_path):
    ours = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ref = reference(tokenizer_dir)
    assert ours.add_tokens(["<Cat-Toy>", "sks"]) == ref.add_tokens(["<Cat-Toy>", "sks"]) == 2
    assert ours.add_tokens(["<special-x>"], special_tokens=True) == ref.add_tokens(["<special-x>"], special_tokens=True)
    assert len(ours) == len(ref) == 49411
    prompts = ["a <cat-toy> photo", "A <CAT-TOY>photo of sks", "asksb sks dog", "<Special-X> vs <special-x>",
               "<cat-toy><cat-toy> sks!"]
    for prompt in prompts:
        assert ours.encode(prompt) == ref(prompt)["input_ids"], prompt
    # Saved and reloaded, by us and by transformers, the added tokens keep their ids.
    ours.save_pretrained(tmp_path / "saved")
    again = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    ref_again = reference(tmp_path / "saved")
    for prompt in prompts:
        assert again.encode(prompt) == ours.encode(prompt) == ref_again(prompt)["input_ids"], prompt


def test_decode_round_trip(pair):
    tok, _ = pair
    assert tok.decode(tok.encode("A Photo of  a CAFÉ, 2 cats 🐱")) == "a photo of a café , 2 cats 🐱"


def test_cleaning_documented_behaviour():
    assert clean_text("  A\t\nB  ") == " a b "
    assert clean_text("ΟΔΟΣ") == "οδοσ"  # per-character lowercase, as tokenizers does
    assert clean_text("e\u0301") == "\u00e9"  # NFC
    assert clean_text("&amp;") == "&amp;"  # no html unescape, no ftfy


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
