"""The generated shapes dataset: caption grammar, the fixed held-out split, deterministic images,
folders the training loader reads, and the image-analysis scorer (exact on clean renders, robust to
blur, noise and colour shifts, and to shapes drawn by a different renderer)."""

import hashlib
import itertools
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cascade_jax.data import DataConfig, make_train_loader
from cascade_jax.demo import shapes as S


def test_caption_grammar_round_trip_over_all_combos():
    assert len(S.ALL_COMBOS) == 8 * 3 * 5 * 7 == 840 and len(set(S.ALL_COMBOS)) == 840
    for combo in S.ALL_COMBOS:
        text = S.caption(combo)
        assert text.startswith("a ") and text.endswith(" background")
        assert S.parse_caption(text) == combo
    red_circle = S.Combo("red", "circle", "top left", "blue")
    assert S.caption(red_circle) == "a red circle in the top left on a blue background"


@pytest.mark.parametrize("text", ["a red circle in the middle on a blue background",
                                  "a red hexagon in the top left on a blue background",
                                  "a red circle in the top left on a red background",
                                  "a crimson circle in the center on a blue background",
                                  "red circle top left", ""])
def test_parse_caption_refuses_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="caption"):
        S.parse_caption(text)


def test_held_out_split_is_fixed_and_covers_every_pair_in_training():
    assert len(S.HELD_OUT) == 126 == round(0.15 * 840)
    train = S.combos_of("train")
    assert len(train) == 714 and not set(train) & S.HELD_OUT and set(train) | S.HELD_OUT == set(S.ALL_COMBOS)
    # Pinned members and a digest of the whole set: a change of the split must be deliberate.
    for text in ("a black circle in the bottom left on a blue background",
                 "a yellow triangle in the top left on a purple background",
                 "a yellow square in the top right on a red background"):
        assert S.split_of(S.parse_caption(text)) == "heldout"
    assert S.split_of(S.parse_caption("a black circle in the bottom left on a green background")) == "train"
    digest = hashlib.sha256("\n".join(sorted(S.caption(c) for c in S.HELD_OUT)).encode()).hexdigest()
    assert digest[:16] == "f24edebb039b69f6"
    # Every attribute value is held out somewhere, and every pair of values is still seen in training.
    for field in S.ATTRIBUTES:
        assert {getattr(c, field) for c in S.HELD_OUT} == {getattr(c, field) for c in S.ALL_COMBOS}
    for a, b in itertools.combinations(S.ATTRIBUTES, 2):
        assert {(getattr(c, a), getattr(c, b)) for c in train} == {(getattr(c, a), getattr(c, b)) for c in S.ALL_COMBOS}
    with pytest.raises(ValueError, match="split 'test'"):
        S.combos_of("test")


def test_generate_is_deterministic_balanced_and_keeps_to_its_split():
    images, captions, combos = S.generate(6, seed=1, size=64)
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    again = S.generate(6, seed=1, size=64)
    np.testing.assert_array_equal(images, again[0])
    assert captions == again[1] == [S.caption(c) for c in combos]
    prefix = S.generate(4, seed=1, size=64)  # image i depends on (seed, i), not on n
    np.testing.assert_array_equal(images[:4], prefix[0])
    assert not np.array_equal(images, S.generate(6, seed=2, size=64)[0])
    assert all(S.split_of(c) == "train" for c in combos)
    held = S.generate(5, seed=1, size=64, split="heldout")[2]
    assert all(c in S.HELD_OUT for c in held)
    counts = np.unique([S.ALL_COMBOS.index(c) for c in S.sample_combos(2 * 714 + 3, seed=4)], return_counts=True)[1]
    assert len(counts) == 714 and set(counts) <= {2, 3}


def test_write_folder_is_read_by_the_folder_loader(tmp_path):
    folder = S.write_folder(tmp_path / "shapes", 8, seed=3, size=64)
    names = sorted(os.listdir(folder))
    assert names == sorted([f"{i:06d}.{e}" for i in range(8) for e in ("png", "txt")] + [S.MANIFEST])
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temp folder left behind
    images, captions, _ = S.generate(8, seed=3, size=64)
    by_caption = dict(zip(captions, images))
    assert len(by_caption) == 8
    cfg = DataConfig(source="folder", paths=(str(folder),), num_workers=1)
    it = iter(make_train_loader(cfg, global_batch_size=4, image_size=64, seed=0))
    seen = []
    for _ in range(2):
        batch = next(it)
        assert batch["images"].shape == (4, 64, 64, 3)
        for image, text in zip(batch["images"], batch["captions"]):
            S.parse_caption(text)
            np.testing.assert_array_equal(image, by_caption[text])
            seen.append(text)
    it.close()
    assert sorted(seen) == sorted(captions)


def test_write_folder_replaces_its_own_folder_and_refuses_a_foreign_one(tmp_path, monkeypatch):
    folder = S.write_folder(tmp_path / "d", 4, seed=0, size=32)
    S.write_folder(folder, 2, seed=1, size=32)  # a dataset this function wrote: replaced whole
    assert sorted(os.listdir(folder)) == ["000000.png", "000000.txt", "000001.png", "000001.txt", S.MANIFEST]
    (tmp_path / "empty").mkdir()
    S.write_folder(tmp_path / "empty", 1, seed=0, size=32)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="photos.*not a shapes dataset"):
        S.write_folder(foreign, 2, seed=0, size=32)
    assert os.listdir(foreign) == ["holiday.jpg"]
    real_render, calls = S.render, []

    def failing_render(*args):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of writing
        return real_render(*args)

    monkeypatch.setattr(S.images, "render", failing_render)  # what write_folder calls
    with pytest.raises(KeyboardInterrupt):
        S.write_folder(folder, 5, seed=9, size=32)
    with pytest.raises(KeyboardInterrupt):
        S.write_folder(tmp_path / "new", 5, seed=9, size=32)
    monkeypatch.undo()
    # The old dataset is untouched, the new one never appears, and no temp folder is left.
    assert sorted(os.listdir(folder)) == ["000000.png", "000000.txt", "000001.png", "000001.txt", S.MANIFEST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "empty", "photos"]
    (folder / "notes.md").write_text("added by hand")
    with pytest.raises(FileExistsError, match="notes.md"):
        S.write_folder(folder, 2, seed=0, size=32)


def renders(combos, size=128, seed=0):
    return np.stack([S.render(c, size, np.random.default_rng([seed, i])) for i, c in enumerate(combos)])


def test_scorer_is_exact_on_clean_renders():
    assert S.accuracy(renders(S.ALL_COMBOS), S.ALL_COMBOS) == {a: 1.0 for a in (*S.ATTRIBUTES, "exact")}


def test_scorer_survives_blur_noise_and_a_colour_shift():
    rng = np.random.default_rng(0)
    combos = [S.ALL_COMBOS[i] for i in rng.choice(840, 300, replace=False)]
    degraded = []
    for image in renders(combos, seed=1):
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)), np.float32)
        shifted = blurred * 0.92 + np.array([15.0, -12.0, 10.0]) + rng.normal(0, 10, blurred.shape)
        degraded.append(np.clip(shifted, 0, 255).astype(np.uint8))
    scores = S.accuracy(degraded, combos)
    for attribute in S.ATTRIBUTES:
        assert scores[attribute] >= 0.95, scores


def drawn_differently(combo, size, cx, cy, side, tint):
    """A hard-edged shape from numpy masks (not the renderer's PIL drawing), slightly off-colour."""
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    half = side / 2
    if combo.shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= half ** 2
    elif combo.shape == "square":
        mask = (abs(xs - cx) <= half) & (abs(ys - cy) <= half)
    else:  # apex up
        mask = (ys >= cy - half) & (ys <= cy + half) & (abs(xs - cx) <= (ys - (cy - half)) / 2)
    image = np.empty((size, size, 3), np.float32)
    image[:] = np.add(S.COLOURS[combo.background], tint)
    image[mask] = np.add(S.COLOURS[combo.colour], tint)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_scorer_reads_shapes_drawn_by_another_renderer():
    rng = np.random.default_rng(5)
    combos = [S.ALL_COMBOS[i] for i in rng.choice(840, 200, replace=False)]
    images = []
    for combo in combos:
        cx, cy = np.add(S.POSITIONS[combo.position], rng.uniform(-0.04, 0.04, 2))
        images.append(drawn_differently(combo, 96, cx, cy, rng.uniform(0.22, 0.3), rng.integers(-12, 13, 3)))
    scores = S.accuracy(images, combos)
    assert min(scores[a] for a in S.ATTRIBUTES) >= 0.98, scores


def test_images_without_an_object_get_wrong_predictions_not_errors():
    for image in (np.full((128, 128, 3), 200, np.uint8), np.zeros((64, 64, 3), np.uint8),
                  np.full((32, 32, 3), S.COLOURS["blue"], np.float32)):
        prediction = S.score_image(image)
        assert prediction.colour is prediction.shape is prediction.position is None
    uniform = np.full((2, 128, 128, 3), S.COLOURS["green"], np.uint8)
    combos = [S.parse_caption("a red circle in the center on a green background")] * 2
    assert S.accuracy(uniform, combos) == {"colour": 0.0, "shape": 0.0, "position": 0.0, "background": 1.0,
                                           "exact": 0.0}
    assert S.score_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).shape in (
        None, *S.SHAPES)  # pure noise: some guess, no exception
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        S.score_image(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="2 images but 1"):
        S.accuracy(uniform, combos[:1])


def load_demo_accuracy():
    from cascade_jax.demo.evaluate import accuracy

    return accuracy


class RenderingPipeline:
    """Stands in for StableCascadePipeline.text_to_image: renders each prompt (seeded by its seed), and
    only the background for the prompts listed in ``blank``."""

    def __init__(self, blank=()):
        self.calls, self.blank = [], set(blank)

    def text_to_image(self, prompts, *, height, width, seed):
        assert height == width and len(seed) == len(prompts)
        self.calls.append((list(prompts), list(seed)))
        images = [np.full((height, width, 3), S.COLOURS[S.parse_caption(p).background], np.uint8) if p in self.blank
                  else S.render(S.parse_caption(p), height, np.random.default_rng(s)) for p, s in zip(prompts, seed)]
        return SimpleNamespace(images=np.stack(images))


def test_evaluate_pipeline_batches_seeds_and_scores():
    demo = load_demo_accuracy()
    combos = demo.sample_split_combos("heldout", 5, seed=0)
    assert combos == demo.sample_split_combos("heldout", 5, seed=0) and all(c in S.HELD_OUT for c in combos)
    assert len(demo.sample_split_combos("heldout", 500, seed=0)) == 126
    pipe = RenderingPipeline(blank={S.caption(combos[0])})
    result = demo.evaluate_pipeline(pipe, combos, per_combo=2, seed=10, size=64, batch_size=4)
    assert [len(p) for p, _ in pipe.calls] == [4, 4, 4]  # 10 images, the last batch padded to the same size
    assert [s for _, seeds in pipe.calls for s in seeds][:10] == list(range(10, 20))
    assert result["n_images"] == 10 and [r["seed"] for r in result["records"]] == list(range(10, 20))
    # The two blank images of combination 0 miss colour, shape and position; everything else is right.
    assert result["accuracy"]["exact"] == 0.8 and result["accuracy"]["background"] == 1.0
    assert result["records"][0]["prediction"]["shape"] is None
    splits = demo.evaluate_splits(RenderingPipeline(), 3, 1, seed=0, size=64, batch_size=2)
    assert list(splits) == ["seen", "held-out"] and all(s["accuracy"]["exact"] == 1.0 for s in splits.values())
    assert [r["seed"] for s in splits.values() for r in s["records"]] == list(range(6))
    table = demo.markdown({"weights": "fake", "date": "now", "size": 64, "per_combo": 1, "seed": 0, "batch_size": 2,
                           "backend": "cpu", "prior": {"steps": 1}, "decoder": {"steps": 1}, "splits": splits})
    assert "| held-out | 3 | 3 | 1.000 |" in table
