"""Official dataset filters (without eval), DataConfig parsing, and the official bucket geometry."""

import math

import numpy as np
import pytest
from PIL import Image

from cascade_jax.data import buckets as bk
from cascade_jax.data.config import DataConfig
from cascade_jax.data.filters import MetadataFilter

OFFICIAL_RATIOS = ["1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16"]


def test_official_filter_form_and_short_form():
    official = MetadataFilter([["width", "lambda w: w >= 768"], ["height", "lambda h: h >= 768"]])
    assert official({"width": 1024, "height": 768})
    assert not official({"width": 1024, "height": 767})
    assert not official({"width": 1024})  # a missing key rejects, as the official MultiFilter
    short = MetadataFilter(["width>=768", "aesthetic > 5.5", "source == laion"])
    assert short({"width": 768, "aesthetic": 6.0, "source": "laion"})
    assert not short({"width": 768, "aesthetic": 5.5, "source": "laion"})
    assert not short({"width": 768, "aesthetic": 6.0, "source": "coyo"})
    pair = MetadataFilter([[["width", "height"], "lambda w, h: w * h >= 768 ** 2 and max(w, h) / min(w, h) < 3"]])
    assert pair({"width": 1024, "height": 600}) and not pair({"width": 3000, "height": 800})
    assert not pair({"width": "wide", "height": 600})  # a rule that raises rejects the sample


@pytest.mark.parametrize("spec, message", [
    (["width", "lambda w: __import__('os').system('true')"], "__import__"),
    (["width", "lambda w: w.__class__"], "Attribute"),
    (["width", "w >= 768"], "must be a lambda"),
    ([["width", "height"], "lambda w: w > 1"], "its keys give 2"),
    ("width >>= 3", "not of the form"),
])
def test_unsafe_or_malformed_filters_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        MetadataFilter([spec])


def test_data_config_from_dict():
    cfg = DataConfig.from_dict({"source": "webdataset", "paths": "shards/{0..3}.tar",
                                "filters": [["width", "lambda w: w >= 768"]], "num_workers": 2})
    assert cfg.paths == ("shards/{0..3}.tar",) and cfg.filters == (("width", "lambda w: w >= 768"),)
    assert cfg.image_keys == ("jpg", "jpeg", "png", "webp") and cfg.caption_field == "txt"
    hash(cfg)  # frozen and hashable, usable as a static jit argument or cache key
    with pytest.raises(ValueError, match="'num_workers'"):
        DataConfig.from_dict({"paths": ["a.tar"], "num_worker": 2})
    with pytest.raises(ValueError, match="unknown"):
        DataConfig(source="s3", paths=("a",))
    with pytest.raises(ValueError, match="tfds_name"):
        DataConfig(source="tfds")
    # What YAML and overrides give is read as the field's type, or refused naming the key.
    assert DataConfig.from_dict({"paths": ["a.tar"], "num_workers": "8", "shuffle": 1}).num_workers == 8
    with pytest.raises(ValueError, match="data.num_workers must be an integer, got 'eight'"):
        DataConfig.from_dict({"paths": ["a.tar"], "num_workers": "eight"})
    with pytest.raises(ValueError, match="data.shuffle must be true or false, got 'maybe'"):
        DataConfig(paths=("a.tar",), shuffle="maybe")


def test_bucket_sizes_equal_the_official_formula():
    for image_size in (768, 1024):
        ratios = bk.bucket_ratios(OFFICIAL_RATIOS)
        # Official: reciprocals appended in order, skipping 1/1 (already there): 12 + 11 ratios.
        assert len(ratios) == 23 and ratios[12] == 1.0 / 0.5
        d = image_size**2
        expected = [(math.floor(math.sqrt(d / r) / 32) * 32, math.floor(math.sqrt(d * r) / 32) * 32) for r in ratios]
        assert bk.bucket_sizes(image_size, ratios) == expected
    sizes = bk.bucket_sizes(1024, bk.bucket_ratios(["1/1", "9/16"]))
    assert sizes == [(1024, 1024), (1344, 768), (768, 1344)]  # hand-computed: sqrt(1024^2*16/9)=1365.3 -> 1344


def test_closest_bucket_and_cover_resize_crop():
    ratios = bk.bucket_ratios(["1/1", "1/2"])  # [1, 0.5, 2]
    assert bk.closest_bucket(200, 100, ratios) == 2 and bk.closest_bucket(100, 190, ratios) == 1
    assert bk.closest_bucket(100, 100, ratios) == 0
    rng = np.random.default_rng(0)
    cases = [((300, 200), (64, 128)), ((90, 400), (128, 64)), ((50, 50), (96, 96)), ((640, 480), (480, 640))]
    for (w, h), target in cases:
        image = Image.fromarray(np.zeros((h, w, 3), np.uint8))
        out = bk.resize_and_crop(image, target, rng)
        assert out.shape == (*target, 3) and out.dtype == np.uint8
    # Official get_resize_size: a 1:2 (h:w) image into 64x128 needs shorter side 64; a 2:1 one needs 128 (256x128).
    assert bk.cover_size((200, 400), (64, 128)) == 64 and bk.cover_size((400, 200), (64, 128)) == 128


def test_bucket_schedule_depends_on_seed_and_step_only():
    ratios = bk.bucket_ratios(["1/1", "1/2", "3/4"])
    sizes = bk.bucket_sizes(256, ratios)
    a = bk.BucketSchedule(sizes, ratios, [5, 1, 1, 1, 0], 0.05, seed=3)
    b = bk.BucketSchedule(sizes, ratios, [5, 1, 1, 1, 0], 0.05, seed=3)
    steps = [a.bucket_index(s) for s in range(2000)]
    assert steps == [b.bucket_index(s) for s in range(2000)]
    counts = np.bincount(steps, minlength=len(sizes)) / len(steps)
    # 95% follow the frequencies (5/8 square), 5% are uniform over the 5 buckets (1% each).
    assert abs(counts[0] - (0.95 * 5 / 8 + 0.01)) < 0.04 and 0 < counts[4] < 0.03
    assert steps != [bk.BucketSchedule(sizes, ratios, [5, 1, 1, 1, 0], 0.05, seed=4).bucket_index(s)
                     for s in range(2000)]


def test_official_ratios_share_shapes_at_768():
    # 4/5 and 5/6 both floor to 832x672 at 768: the loader treats a bucket as its shape, not its ratio.
    sizes = bk.bucket_sizes(768, bk.bucket_ratios(OFFICIAL_RATIOS))
    ratios = bk.bucket_ratios(OFFICIAL_RATIOS)
    assert sizes[ratios.index(0.8)] == sizes[ratios.index(5 / 6)] == (832, 672)
