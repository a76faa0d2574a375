"""The storage layer against real S3 and GCS APIs on loopback (moto, gcp-storage-emulator): file
operations, WebDataset shards and image folders read from buckets exactly as from disk, shard indexes
cached by object version, and the faults: a missing bucket, an object deleted mid-run, a server that
answers 503 for a while, a stopped server, a corrupt shard, and writes that leave nothing half-written.
No model is compiled here."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from data_testing import image_bytes, write_shards
from storage_testing import FaultProxy, upload_folder

from cascade_jax import storage
from cascade_jax.data import DataConfig, make_train_loader
from cascade_jax.storage import faults, urls


def loader(cfg, batch=4):
    return make_train_loader(cfg, global_batch_size=batch, image_size=32, seed=0)


def batches(cfg, n=3) -> list[dict]:
    it = iter(loader(cfg))
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def assert_same_batches(a: list[dict], b: list[dict]):
    for x, y in zip(a, b, strict=True):
        assert x["captions"] == y["captions"]
        np.testing.assert_array_equal(x["images"], y["images"])


def test_url_strings():
    assert urls.join("gs://b/x/", "y", "z.tar") == "gs://b/x/y/z.tar"
    assert urls.split("s3://b/k/v.tar") == ("s3://b/k", "v.tar") and urls.parent("gs://b/k") == "gs://b"
    assert urls.with_suffix("gs://b/out/generator", ".safetensors") == "gs://b/out/generator.safetensors"
    assert urls.bucket_of("s3://bucket/a/b") == "s3://bucket"
    assert not urls.is_url("/tmp/x") and not urls.is_url("file:///tmp/x") and urls.local("file:///tmp/x") == "/tmp/x"


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_file_operations_and_whole_object_writes(object_stores, scheme):
    bucket = object_stores.bucket(scheme)
    storage.write_text(f"{bucket}/a/b.txt", "hello world")
    assert storage.read_text(f"{bucket}/a/b.txt") == "hello world"
    assert storage.read_range(f"{bucket}/a/b.txt", 6, 5) == b"world"
    first = storage.stat(f"{bucket}/a/b.txt")
    storage.write_text(f"{bucket}/a/b.txt", "hello again")
    assert storage.stat(f"{bucket}/a/b.txt")["version"] != first["version"]  # generation / ETag
    assert storage.isdir(f"{bucket}/a") and storage.isfile(f"{bucket}/a/b.txt")
    assert list(storage.listing(bucket)) == ["a/b.txt"]
    assert [u for u, _ in storage.glob(f"{bucket}/a/*.txt")] == [f"{bucket}/a/b.txt"]
    with pytest.raises(RuntimeError), storage.open_write(f"{bucket}/half.bin") as f:
        f.write(b"x" * 100)
        raise RuntimeError("the writer fails midway")
    assert not storage.exists(f"{bucket}/half.bin"), "a failed write left an object behind"
    with pytest.raises(FileNotFoundError, match=f"{bucket}/missing.txt: no such object"):
        storage.read_bytes(f"{bucket}/missing.txt")
    with pytest.raises(FileNotFoundError, match=r"the bucket .*nobucket-\w+ does not exist"):
        storage.read_bytes(f"{scheme}://nobucket-{scheme}x/a.txt")


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, 3, 6)
    return folder


def test_webdataset_from_s3_reads_what_the_disk_reads(object_stores, shard_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    bucket = object_stores.bucket("s3")
    upload_folder(shard_folder, f"{bucket}/data")
    local = DataConfig(source="webdataset", paths=(str(shard_folder / "shard-{000..002}.tar"),), num_workers=2)
    expected = batches(local)
    for paths in ([f"{bucket}/data/shard-{{000..002}}.tar"], [f"{bucket}/data/*.tar"], [f"{bucket}/data"],
                  [f"{bucket}/data/shard-000.tar", f"{bucket}/data/shard-00{{1,2}}.tar"]):
        assert_same_batches(batches(dataclasses.replace(local, paths=tuple(paths))), expected)
    # In order (no shuffle), remote shards are streamed in blocks: the same samples as the disk gives.
    in_order = dataclasses.replace(local, shuffle=False)
    assert_same_batches(batches(dataclasses.replace(in_order, paths=(f"{bucket}/data",))), batches(in_order))


def test_remote_shard_index_is_cached_by_object_version(object_stores, shard_folder, tmp_path, monkeypatch):
    import cascade_jax.data.webdataset as wds

    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    bucket = object_stores.bucket("gs")
    upload_folder(shard_folder, f"{bucket}/data")
    cfg = DataConfig(source="webdataset", paths=(f"{bucket}/data/*.tar",), num_workers=2)
    first = batches(cfg, 1)
    assert len(list((tmp_path / "cache" / "webdataset_index").glob("*.json"))) == 3
    real_index = wds.index_shard
    monkeypatch.setattr(wds, "index_shard", lambda path, size=None: pytest.fail(f"{path} was scanned again"))
    assert_same_batches(batches(cfg, 1), first)
    # Replacing one object (new generation) scans that shard alone again.
    storage.upload(shard_folder / "shard-000.tar", f"{bucket}/data/shard-002.tar")
    scanned = []
    monkeypatch.setattr(wds, "index_shard", lambda path, size=None: scanned.append(path) or real_index(path, size))
    loader(cfg)
    assert scanned == [f"{bucket}/data/shard-002.tar"]
    # The cache may itself live in a bucket, shared by every host.
    shared = dataclasses.replace(cfg, index_cache=f"{bucket}/index")
    loader(shared)
    assert len(storage.listing(f"{bucket}/index")) == 3


def test_image_folder_and_latent_cache_in_buckets(object_stores, tmp_path):
    from cascade_jax.training.latent_cache import CachedBatches

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(image_bytes(i, size=(40, 32), fmt="PNG"))
        (folder / f"{i}.txt").write_text(f"caption {i}")
    bucket = object_stores.bucket("gs")
    upload_folder(folder, f"{bucket}/images")
    local = DataConfig(source="folder", paths=(str(folder),), num_workers=2)
    assert_same_batches(batches(dataclasses.replace(local, paths=(f"{bucket}/images",)), 2), batches(local, 2))
    for step in range(2):
        buffer = __import__("io").BytesIO()
        np.savez(buffer, clip_text=np.full((2, 3), step, np.float32))
        storage.write_bytes(f"{bucket}/latents/{step:08d}.npz", buffer.getvalue())
    cached = CachedBatches(f"{bucket}/latents")
    assert [float(next(cached)["clip_text"][0, 0]) for _ in range(3)] == [0.0, 1.0, 0.0]


def test_a_missing_bucket_is_one_clear_message_before_any_work(object_stores, tmp_path):
    from cascade_jax.training import config_from_dict
    from cascade_jax.training.paths import check_run_paths

    gs = object_stores.bucket("gs")
    base = {"stage": "c", "checkpoint_path": f"{gs}/ckpt", "output_path": f"{gs}/out",
            "data": {"source": "webdataset", "paths": ["s3://no-such-bucket-34/part-{000..009}.tar"]}}
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-34 does not exist"):
        check_run_paths(config_from_dict(base))
    for scheme in ("gs", "s3"):  # Orbax writes both (s3:// through storage/orbax_s3.py)
        with pytest.raises(FileNotFoundError, match=f"{scheme}://no-such-bucket-34 does not exist"):
            check_run_paths(config_from_dict({**base, "data": None,
                                              "checkpoint_path": f"{scheme}://no-such-bucket-34/c"}))
    with pytest.raises(ValueError, match=r"checkpoint_path memory://x/ckpt/cascade_jax: Orbax .* gs://, s3://"):
        check_run_paths(config_from_dict({**base, "data": None, "checkpoint_path": "memory://x/ckpt"}))
    with pytest.raises(FileNotFoundError, match="no such object"):
        check_run_paths(config_from_dict({**base, "data": None, "generator_checkpoint_path": f"{gs}/nothing"}))


def test_permission_and_region_faults_are_named():
    denied = faults.explain("s3://b/k", PermissionError("AccessDenied"), "read")
    assert isinstance(denied, PermissionError) and "s3://b/k" in str(denied) and "credentials" in str(denied)
    region = faults.explain("s3://b/k", OSError("PermanentRedirect: The bucket you are attempting to access must "
                                                "be addressed using the specified endpoint"), "read")
    assert isinstance(region, faults.StorageError) and "AWS_REGION" in str(region)
    assert faults.is_transient(OSError("503 SlowDown")) and faults.is_transient(ConnectionRefusedError())
    assert not faults.is_transient(FileNotFoundError("x")) and not faults.is_transient(ValueError("bad header"))


def test_deleted_object_and_corrupt_shard_are_skipped_and_counted(object_stores, shard_folder, tmp_path,
                                                                  monkeypatch, caplog):
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    bucket = object_stores.bucket("s3")
    upload_folder(shard_folder, f"{bucket}/data")
    storage.write_bytes(f"{bucket}/data/shard-009.tar", b"not a tar file" * 100)
    before = storage.fault_counts().get("skipped_shards", 0)
    with caplog.at_level(logging.WARNING):
        it = iter(loader(DataConfig(source="webdataset", paths=(f"{bucket}/data/*.tar",), num_workers=2)))
    assert storage.fault_counts()["skipped_shards"] == before + 1 and "shard-009.tar" in caplog.text
    storage.remove(f"{bucket}/data/shard-001.tar")  # deleted while the run reads
    for _ in range(6):
        assert next(it)["images"].shape[0] == 4
    assert it.skip_counts["unreadable"] > 0
    it.close()


def test_transient_503s_are_retried_and_counted_then_a_stopped_server_is_an_error(object_stores, monkeypatch,
                                                                                 caplog):
    bucket = object_stores.bucket("s3")
    payload = bytes(range(256)) * 64
    storage.write_bytes(f"{bucket}/obj.bin", payload)
    proxy = FaultProxy(object_stores.s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("CASCADE_JAX_STORAGE_RETRY_SECONDS", "3")
    assert storage.read_bytes(f"{bucket}/obj.bin") == payload  # through the proxy
    retries = storage.fault_counts().get("retries", 0)
    proxy.fail_next(8)
    with caplog.at_level(logging.WARNING):
        assert storage.read_range(f"{bucket}/obj.bin", 100, 1000) == payload[100:1100]
    assert proxy.failed == 8 and storage.fault_counts()["retries"] >= retries + 7
    assert "retr" in caplog.text
    # A stopped server: retried for the budget (3 s here), then one error naming the URL; a write never
    # reached the bucket, so nothing half-written is there.
    proxy.stop()
    with pytest.raises(storage.StorageError, match=f"cannot write {bucket}/new.bin.*tries"):
        storage.write_bytes(f"{bucket}/new.bin", payload)
    monkeypatch.setenv("AWS_ENDPOINT_URL", object_stores.s3_endpoint)
    assert not storage.exists(f"{bucket}/new.bin")


def test_safetensors_to_a_bucket_appear_whole_or_not_at_all(object_stores, tmp_path):
    from cascade_jax.weights.safetensors_io import SafetensorsReader, save_safetensors, write_safetensors

    bucket = object_stores.bucket("gs")
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}
    save_safetensors(f"{bucket}/t.safetensors", tensors, metadata={"k": json.dumps([1])})
    reader = SafetensorsReader(f"{bucket}/t.safetensors")  # read from a local copy
    assert reader.metadata == {"k": "[1]"} and np.array_equal(reader.get("a"), tensors["a"])

    def failing(key):
        raise RuntimeError("the export fails after the header")

    with pytest.raises(RuntimeError):
        write_safetensors(f"{bucket}/broken.safetensors", [("a", np.float32, (2, 3))], failing)
    assert not storage.exists(f"{bucket}/broken.safetensors")
