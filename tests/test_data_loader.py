"""The Grain training loader on WebDataset shards and image folders: paths, filters, captions,
skipped samples (and those known up front), buckets agreed across hosts, disjoint host shards, exact
resume, the captions sample collages prompt with."""

import dataclasses
import json

import grain
import numpy as np
import pytest
from data_testing import add_member, caption_index, image_bytes, read_all, write_folder, write_shards
from etils import epath

from cascade_jax.data import DataConfig, make_train_loader
from cascade_jax.data.webdataset import expand_braces

RATIOS = ["1/1", "1/2"]  # buckets at 64: (64, 64), (64, 32), (32, 64)


def wds_config(root, **kw):
    return DataConfig(source="webdataset", paths=(str(root / "shard-{000..001}.tar"), str(root / "extra-*.tar")),
                      num_workers=2, **kw)


def loader(cfg, batch=4, ratios=RATIOS, seed=0, index=0, count=1):
    return make_train_loader(cfg, global_batch_size=batch, image_size=64, multi_aspect_ratio=ratios, seed=seed,
                             process_index=index, process_count=count)


def test_brace_expansion():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/{8..10}") == ["x/8", "x/9", "x/10", "y/8", "y/9", "y/10"]


@pytest.fixture()
def shards(tmp_path):
    """Two brace-named shards of 8 plus a glob-named one; sample 3 has a corrupt image, 5 no caption."""
    def damage(i, key, tar):
        if i == 3:
            add_member(tar, f"{key}.txt", b"caption 3")
            add_member(tar, f"{key}.jpg", image_bytes(3)[:40])  # a truncated JPEG: header without data
            return True
        if i == 5:
            add_member(tar, f"{key}.png", image_bytes(5, fmt="PNG"))
            return True
        return False

    write_shards(tmp_path, 2, 8, extra=damage)
    extra = write_shards(tmp_path / "x", 1, 4)[0]
    extra.rename(tmp_path / "extra-000.tar")
    return tmp_path


def test_webdataset_batches_skip_and_count_bad_samples(shards):
    it = iter(loader(wds_config(shards), batch=4, ratios=None))
    batches = read_all(it, 7)  # 7 x 4 = 28 samples from 18 usable: more than one epoch
    for batch in batches:
        assert batch["bucket"] == (64, 64) and batch["images"].shape == (4, 64, 64, 3)
        assert batch["images"].dtype == np.uint8 and len(batch["captions"]) == 4
    seen = {caption_index(c) for b in batches for c in b["captions"]}
    # The glob shard's samples are numbered 0..3 again; sample 3 and 5 of the brace shards are bad.
    assert seen == set(range(16)) - {5} | {0, 1, 2, 3}
    assert not any(caption_index(c) == 5 for b in batches for c in b["captions"])
    counts = it.skip_counts
    assert counts["no_caption"] >= 1 and counts["corrupt_image"] >= 1 and counts["filtered"] == 0
    # Known from the shard index before any read (the trainer's start-up line says so).
    assert it.source.uncaptioned == [f"{shards / 'shard-000.tar'}:000005"]
    it.close()


def test_webdataset_json_captions_and_official_filters(tmp_path):
    write_shards(tmp_path, 2, 6, caption="json")
    # Metadata: width = 10 x image width; aesthetic = 4 + i % 3. Keep wide-enough, aesthetic >= 5 samples.
    cfg = DataConfig(source="webdataset", paths=(str(tmp_path / "shard-*.tar"),), caption_key="json:caption",
                     filters=(["width", "lambda w: w >= 900"], "aesthetic>=5"), num_workers=2)
    it = iter(loader(cfg, batch=2, ratios=None))
    captions = [c for b in read_all(it, 6) for c in b["captions"]]
    expected = {i for i in range(12) if (96, 128, 64, 120)[i % 4] * 10 >= 900 and 4 + i % 3 >= 5}
    assert {caption_index(c) for c in captions} == expected
    assert it.skip_counts["filtered"] >= 12 - len(expected)
    it.close()


def test_folder_source_and_missing_captions(tmp_path):
    write_folder(tmp_path, 6, skip_caption={2})
    cfg = DataConfig(source="folder", paths=(str(tmp_path),), num_workers=2, filters=("height>=90",))
    it = iter(loader(cfg, batch=2, ratios=RATIOS))
    batches = read_all(it, 4)
    # Image sizes cycle 96x96, 128x64, 64x128, 120x90: height >= 90 keeps 0, 2, 3, 4; 2 has no caption.
    assert {caption_index(c) for b in batches for c in b["captions"]} == {0, 3, 4}
    for b in batches:
        assert b["images"].shape == (2, *b["bucket"], 3)
    assert it.skip_counts["no_caption"] >= 1 and it.skip_counts["filtered"] >= 2
    assert it.source.uncaptioned == [str(tmp_path / "img_002.png")]  # from the listing, before any read
    # The captions sample collages prompt with: distinct ones of usable samples, the same on a fresh iterator.
    captions = it.sample_captions(4)
    assert sorted(captions) == ["caption 0", "caption 3", "caption 4"]
    assert iter(loader(cfg, batch=2, ratios=RATIOS)).sample_captions(2) == captions[:2]
    it.close()


def test_nothing_usable_is_a_clear_error(tmp_path):
    write_folder(tmp_path / "f", 3, skip_caption={0, 1, 2})
    with pytest.raises(ValueError, match=r"no usable sample in .*f.*no_caption"):
        loader(DataConfig(source="folder", paths=(str(tmp_path / "f"),)))
    with pytest.raises(FileNotFoundError, match="nothing-.*matches no file"):
        loader(DataConfig(source="webdataset", paths=(str(tmp_path / "nothing-{0..3}.tar"),)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        loader(DataConfig(source="folder", paths=(str(tmp_path / "empty"),)))


def test_hosts_agree_on_buckets_and_read_disjoint_samples(tmp_path):
    write_shards(tmp_path, 4, 8)
    cfg = DataConfig(source="webdataset", paths=(str(tmp_path / "shard-{000..003}.tar"),), num_workers=2)
    hosts = [iter(loader(cfg, batch=4, seed=7, index=i, count=2)) for i in range(2)]
    steps = [read_all(h, 8) for h in hosts]
    assert {b["bucket"] for b in steps[0]} != {(64, 64)}, "the test needs several buckets to mean anything"
    for a, b in zip(*steps):
        assert a["bucket"] == b["bucket"] and a["images"].shape == b["images"].shape == (2, *a["bucket"], 3)
    for h in hosts:
        h.close()
    # One epoch (32 samples, 16 per host) with one bucket, so nothing is held back: disjoint halves.
    hosts = [iter(loader(cfg, batch=4, ratios=None, seed=7, index=i, count=2)) for i in range(2)]
    seen = [[caption_index(c) for b in read_all(h, 8) for c in b["captions"]] for h in hosts]
    assert len(set(seen[0])) == len(set(seen[1])) == 16 and set(seen[0]) | set(seen[1]) == set(range(32))
    for h in hosts:
        h.close()


def test_resume_from_saved_state_gives_identical_batches(tmp_path):
    write_shards(tmp_path, 2, 10)
    cfg = DataConfig(source="webdataset", paths=(str(tmp_path / "shard-*.tar"),), num_workers=2, max_pending=3)
    ref = iter(loader(cfg, batch=3, seed=1))
    read_all(ref, 5)
    handler = grain.checkpoint.CheckpointHandler()  # what Orbax's CheckpointManager calls for a Grain item
    (tmp_path / "ckpt").mkdir()
    handler.save(epath.Path(tmp_path / "ckpt"), item=ref)
    expected = read_all(ref, 6)
    resumed = iter(loader(cfg, batch=3, seed=1))
    handler.restore(epath.Path(tmp_path / "ckpt"), item=resumed)
    assert json.loads(next((tmp_path / "ckpt").glob("process_0-of-1.json")).read_text())["step"] == 5
    for a, b in zip(expected, read_all(resumed, 6)):
        assert a["bucket"] == b["bucket"] and a["captions"] == b["captions"]
        np.testing.assert_array_equal(a["images"], b["images"])
    assert resumed.get_state() == ref.get_state()
    ref.close()
    resumed.close()


def test_two_hosts_together_read_the_one_process_batch(tmp_path):
    """With one bucket and no bad samples, host batches concatenated in process order are the global batch."""
    write_shards(tmp_path, 2, 10)
    cfg = DataConfig(source="webdataset", paths=(str(tmp_path / "shard-*.tar"),), num_workers=2)
    single = iter(loader(cfg, batch=4, ratios=None, seed=2))
    hosts = [iter(loader(cfg, batch=4, ratios=None, seed=2, index=i, count=2)) for i in range(2)]
    for _ in range(7):  # past the 20-sample epoch
        whole, parts = next(single), [next(h) for h in hosts]
        assert whole["captions"] == parts[0]["captions"] + parts[1]["captions"]
        np.testing.assert_array_equal(whole["images"], np.concatenate([p["images"] for p in parts]))
    for it in [single, *hosts]:
        it.close()


def test_unexpected_errors_in_one_sample_are_counted_not_fatal(tmp_path, monkeypatch):
    import cascade_jax.data.loader as loader_module

    write_folder(tmp_path, 6)
    real_decode = loader_module.decode_rgb

    def flaky_decode(raw, *limits):
        if raw.name.endswith("img_003.png"):
            raise RuntimeError("a decoder bug on one odd file")
        return real_decode(raw, *limits)

    monkeypatch.setattr(loader_module, "decode_rgb", flaky_decode)
    it = iter(loader(DataConfig(source="folder", paths=(str(tmp_path),), num_workers=2), batch=5, ratios=None))
    batch = next(it)
    assert sorted(caption_index(c) for c in batch["captions"]) == [0, 1, 2, 4, 5]
    assert it.skip_counts["unreadable"] == 1
    it.close()
    # Every image failing (after the start-up probe, which reads headers only): a clear error, twice.
    def broken_decode(raw, *limits):
        raise RuntimeError("a decoder bug on every file")

    monkeypatch.setattr(loader_module, "decode_rgb", broken_decode)
    it = iter(loader(DataConfig(source="folder", paths=(str(tmp_path),), num_workers=2), batch=2, ratios=None))
    for _ in range(2):
        with pytest.raises(ValueError, match="no usable sample in a whole pass.*unreadable"):
            next(it)
    it.close()


def test_bad_shards_are_errors_naming_the_file(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match=r"a\.tar\.gz.*compressed"):
        loader(DataConfig(source="webdataset", paths=(str(tmp_path / "a.tar.gz"),)))
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match=r"b\.tar.*cannot be read as a tar"):
        loader(DataConfig(source="webdataset", paths=(str(tmp_path / "b.tar"),)))


def test_ratios_sharing_a_shape_form_one_bucket(tmp_path):
    # At 64 px, 1/2 and 3/4 both give 64x32: portrait images of either ratio fill every portrait step.
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i, size=(64, 128) if i % 2 else (90, 120), fmt="PNG"))
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    cfg = DataConfig(source="folder", paths=(str(tmp_path),), num_workers=2, bucket_random_ratio=0.0)
    it = iter(loader(cfg, batch=2, ratios=["1/2", "3/4"]))
    for _ in range(6):
        assert next(it)["bucket"] == (64, 32)
        assert it.get_state()["pending"] == []
    it.close()


def test_shard_index_cache_is_reused_and_refreshed(tmp_path, monkeypatch):
    import cascade_jax.data.webdataset as wds

    write_shards(tmp_path / "s", 2, 5)
    cfg = DataConfig(source="webdataset", paths=(str(tmp_path / "s" / "*.tar"),), num_workers=2,
                     index_cache=str(tmp_path / "cache"))
    plain = next(iter(loader(dataclasses.replace(cfg, index_cache=None), ratios=None)))
    first = next(iter(loader(cfg, ratios=None)))
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    real_index = wds.index_shard
    monkeypatch.setattr(wds, "index_shard", lambda path: pytest.fail(f"{path} was scanned again"))
    again = next(iter(loader(cfg, ratios=None)))
    for batch in (first, again):
        assert batch["captions"] == plain["captions"]
        np.testing.assert_array_equal(batch["images"], plain["images"])
    # A rewritten shard (new size and mtime) is scanned again.
    write_shards(tmp_path / "s", 1, 3)
    scanned = []
    monkeypatch.setattr(wds, "index_shard", lambda path: scanned.append(path) or real_index(path))
    assert len(loader(cfg, ratios=None).plan.source.records) == 3 + 5
    assert [p.endswith("shard-000.tar") for p in scanned] == [True]


def test_fast_tar_scan_equals_tarfile(tmp_path):
    import tarfile

    from cascade_jax.data.webdataset import _scan_ustar, index_shard

    path = write_shards(tmp_path, 1, 4)[0]
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    assert _scan_ustar(str(path)) == expected
    long_name = tmp_path / "long.tar"
    with tarfile.open(long_name, "w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "d" * 120 + "/0001.txt", b"a caption")  # needs a pax header: tarfile's path
        add_member(tar, "0002.txt", b"another")
    assert _scan_ustar(str(long_name)) is None
    assert [k for k, _ in index_shard(str(long_name))] == ["d" * 120 + "/0001", "0002"]


def test_batches_depend_on_the_seed_not_on_threads(tmp_path):
    write_shards(tmp_path, 2, 8)
    cfg = DataConfig(source="webdataset", paths=(str(tmp_path / "shard-*.tar"),), num_workers=1, prefetch_batches=1)

    def run(seed, **changes):
        it = iter(loader(dataclasses.replace(cfg, **changes), batch=3, seed=seed))
        batches = read_all(it, 5)
        it.close()
        return [(b["bucket"], b["captions"], b["images"].tobytes()) for b in batches]

    reference = run(5)
    assert run(5, num_workers=3, prefetch_batches=4) == reference
    assert run(6) != reference


def test_fingerprint_tells_hosts_that_see_different_data(tmp_path):
    write_shards(tmp_path, 3, 4)
    cfg = DataConfig(source="webdataset", paths=(str(tmp_path / "shard-{000..002}.tar"),), num_workers=2)
    prints = {loader(cfg, seed=1, index=i, count=2).fingerprint() for i in range(2)}
    assert len(prints) == 1
    fewer = dataclasses.replace(cfg, paths=(str(tmp_path / "shard-{000..001}.tar"),))
    assert loader(fewer, seed=1, index=1, count=2).fingerprint() not in prints
    assert loader(cfg, seed=2, index=1, count=2).fingerprint() not in prints


def test_reshuffled_passes_of_few_good_samples_train_on(tmp_path):
    """2 good and 4 corrupt images: runs of bad samples that end one (reshuffled) pass and start the next are
    not a pass without a usable sample (the probe's run died at update 13)."""
    write_folder(tmp_path, 6)
    for i in (1, 2, 3, 5):  # corrupt: a PNG signature and nothing after it
        (tmp_path / ("sub" if i % 2 else "") / f"img_{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    it = iter(loader(DataConfig(source="folder", paths=(str(tmp_path),), num_workers=2), batch=2, ratios=None))
    captions = [caption_index(c) for b in read_all(it, 40) for c in b["captions"]]
    assert set(captions) == {0, 4} and len(captions) == 80
    assert it.skip_counts["corrupt_image"] >= 4 * 39
    it.close()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with no pixel data: what a 100-byte bomb looks like
    before it is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_decompression_bombs_are_skipped_by_their_header_size(tmp_path):
    write_folder(tmp_path, 4)
    # 144 megapixels (over PIL's 89.5M warning threshold, under its 179M error) and 400 megapixels.
    for name, side in (("bomb_a", 12000), ("bomb_b", 20000)):
        (tmp_path / f"{name}.png").write_bytes(png_header(side, side))
        (tmp_path / f"{name}.txt").write_text("caption 99")
    it = iter(loader(DataConfig(source="folder", paths=(str(tmp_path),), num_workers=2), batch=4, ratios=None))
    captions = [caption_index(c) for b in read_all(it, 3) for c in b["captions"]]
    assert 99 not in captions and it.skip_counts["too_large"] >= 2 and it.skip_counts["corrupt_image"] == 0
    it.close()
    # The limit is the data section's max_image_pixels: here real 64x64 images (4096 pixels) are over it.
    small = DataConfig(source="folder", paths=(str(tmp_path / "sub"),), num_workers=2, max_image_pixels=4095)
    with pytest.raises(ValueError, match=r"no usable sample.*too_large"):
        loader(small, batch=1, ratios=None)
    with pytest.raises(ValueError, match="max_image_pixels=0 must be >= 1"):
        DataConfig(source="folder", paths=(str(tmp_path),), max_image_pixels=0)
