#!/usr/bin/env python
"""Object storage side by side with local disk, in one process: the training loader's throughput
(images/s) from the same WebDataset shards on disk and in an S3 bucket (moto's server on loopback), with
1 and 2 decoding threads; start-up of a loader over 1,000 small shards in S3 without and with the cached
shard index; and a train checkpoint's save and restore to a gs:// bucket (gcp-storage-emulator on
loopback) against local disk.

The servers are Python emulators on this machine: the bucket figures measure the client side plus a
loopback server sharing the CPU with the reader, not a cloud's bandwidth or latency. Every contender runs
interleaved with its pair (A B, B A, ...) so machine load hits both alike; the median is reported.

    python benchmarks/bench_storage.py [--repeats 3] [--out benchmarks/results/storage.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS_DIR, REPO_ROOT, alternate, log, machine_info, summarize, write_report  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "tests"))  # the loopback S3 / GCS servers of the tests


def jpeg_shards(folder: Path, shards: int, per_shard: int, side: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"part-{s:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
                pixels[side // 4:] //= 3  # some structure, so JPEG sizes are realistic-ish
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
                for field, data in (("jpg", buffer.getvalue()), ("txt", f"image {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{s:04d}{i:05d}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def loader_images_per_s(cfg, batches: int, batch: int) -> float:
    from cascade_jax.data import make_train_loader

    it = iter(make_train_loader(cfg, global_batch_size=batch, image_size=128, seed=0))
    try:
        next(it)  # start-up and the first batch are not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch / (time.perf_counter() - start)
    finally:
        it.close()


def bench_loader(work: Path, s3: str, repeats: int) -> dict:
    from storage_testing import upload_folder

    from cascade_jax.data import DataConfig

    jpeg_shards(work / "jpeg", shards=8, per_shard=48, side=256)
    upload_folder(work / "jpeg", f"{s3}/jpeg")
    size = sum(p.stat().st_size for p in (work / "jpeg").glob("*.tar"))
    out = {"shards": 8, "images": 8 * 48, "image_side": 256, "bytes": size, "bucket_size": 128, "batch": 16}
    for workers in (1, 2):
        local = DataConfig(source="webdataset", paths=(str(work / "jpeg" / "*.tar"),), num_workers=workers)
        remote = dataclasses.replace(local, paths=(f"{s3}/jpeg/*.tar",))
        rates = {"disk": [], "s3": []}
        for i in range(repeats):
            for name, cfg in (("disk", local), ("s3", remote)) if i % 2 == 0 else (("s3", remote), ("disk", local)):
                rates[name].append(loader_images_per_s(cfg, batches=12, batch=16))
        out[f"threads_{workers}"] = {k: {"images_per_s": float(np.median(v)), "samples": v} for k, v in rates.items()}
        log(f"loader, {workers} thread(s): disk {np.median(rates['disk']):.0f} images/s, "
            f"s3 {np.median(rates['s3']):.0f} images/s")
    return out


def bench_startup(work: Path, s3: str, repeats: int) -> dict:
    import os

    from storage_testing import upload_folder

    from cascade_jax.data import DataConfig
    from cascade_jax.data.webdataset import WebDatasetSource

    folder = work / "small"
    for s in range(1000):  # 1,000 shards of 4 small samples each
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(4):
                for field, data in (("jpg", b"\xff\xd8" + bytes(600)), ("txt", b"caption")):
                    info = tarfile.TarInfo(f"{s:04d}{i}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        folder.mkdir(exist_ok=True)
        (folder / f"part-{s:04d}.tar").write_bytes(buffer.getvalue())
    upload_folder(folder, f"{s3}/small")
    cfg = DataConfig(source="webdataset", paths=(f"{s3}/small/part-{{0000..0999}}.tar",), num_workers=8)
    caches = iter(range(10**6))

    def cold():  # no index anywhere: every shard's headers read over the API
        os.environ["CASCADE_JAX_CACHE"] = str(work / f"cold-{next(caches)}")
        WebDatasetSource(cfg)

    os.environ["CASCADE_JAX_CACHE"] = str(work / "warm")
    WebDatasetSource(cfg)  # writes the index once

    def warm():
        os.environ["CASCADE_JAX_CACHE"] = str(work / "warm")
        WebDatasetSource(cfg)

    samples = alternate({"without_index": cold, "with_index": warm}, repeats)
    out = {"shards": 1000, "samples_per_shard": 4, "threads": 8,
           **{k: summarize(v) for k, v in samples.items()}}
    log(f"start-up over 1,000 shards in s3: {out['without_index']['median_s']:.2f} s without the index, "
        f"{out['with_index']['median_s']:.2f} s with it")
    return out


def bench_checkpoint(work: Path, gs: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from cascade_jax.training.checkpointing import TrainCheckpointer

    rng = np.random.default_rng(0)
    state = {f"layer{i}": jnp.asarray(rng.standard_normal((1024, 1024), np.float32)) for i in range(16)}  # 64 MiB
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {k: sharding for k in state}
    steps = iter(range(1, 10**6))
    out = {"state_mib": 64}
    for name, root in (("disk", str(work / "ckpt")), ("gs", f"{gs}/ckpt")):
        checkpointer = TrainCheckpointer(root, save_every=1, keep=2, backup_every=None, use_async=False)
        saved = []

        def save():
            step = next(steps)
            checkpointer.save(step, state, {"position": step}, {"run": "bench"}, force=True)
            saved.append(step)

        def restore():
            checkpointer.restore(saved[-1], state, shardings)

        save()  # warm-up: the first save creates the folder
        restore()
        out[name] = {k: summarize(v) for k, v in alternate({"save": save, "restore": restore}, repeats).items()}
        checkpointer.close()
    for op in ("save", "restore"):
        log(f"checkpoint {op} (64 MiB): disk {out['disk'][op]['median_s']:.2f} s, gs {out['gs'][op]['median_s']:.2f} s")
    return out


def table(report: dict) -> str:
    loader, startup, ckpt = report["loader"], report["startup"], report["checkpoint"]
    rows = ["| what | local disk | bucket (loopback emulator) |", "|---|---|---|"]
    for workers in (1, 2):
        case = loader[f"threads_{workers}"]
        rows.append(f"| loader, {workers} decoding thread(s), images/s | {case['disk']['images_per_s']:.0f} | "
                    f"{case['s3']['images_per_s']:.0f} (s3) |")
    rows.append(f"| loader start-up, 1,000 shards in s3, s | — | {startup['without_index']['median_s']:.2f} without "
                f"index, {startup['with_index']['median_s']:.2f} with |")
    for op in ("save", "restore"):
        rows.append(f"| checkpoint {op}, 64 MiB, s | {ckpt['disk'][op]['median_s']:.2f} | "
                    f"{ckpt['gs'][op]['median_s']:.2f} (gs) |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "storage.json")
    args = p.parse_args(argv)
    from storage_testing import start_object_stores

    stores, stop = start_object_stores()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            s3, gs = stores.bucket("s3"), stores.bucket("gs")
            report = {"machine": machine_info(), "note": "loopback emulators (moto, gcp-storage-emulator) in the "
                      "same process as the reader; interleaved runs, medians",
                      "loader": bench_loader(work, s3, args.repeats),
                      "startup": bench_startup(work, s3, args.repeats),
                      "checkpoint": bench_checkpoint(work, gs, args.repeats)}
        write_report(args.out, report, table(report))
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
