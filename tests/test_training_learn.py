"""Tiny Stage C and Stage B runs learn from a folder dataset the test writes (through the Grain
loader, frozen random encoders, the full step), and export weights that load and run; tiny Stage C
also learns from WebDataset shards and from a TFDS dataset (the other two sources)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from data_testing import TFDS_NAME, write_shards, write_tfds
from PIL import Image
from safetensors import safe_open
from training_testing import ImageData

from cascade_jax.data import global_batch
from cascade_jax.training import build_run, export_run, load_config, train
from cascade_jax.training.loop import host_rng, make_data_iterator
from cascade_jax.nn.params import named_variables
from cascade_jax.sharding import make_mesh
from cascade_jax.training.export import generator_arrays
from cascade_jax.weights.checkpoint import load_model

STEPS = 30


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    data = ImageData(batch=48, size=64)
    batch = next(data)
    for i, (image, caption) in enumerate(zip(batch["images"], batch["captions"])):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    (folder / "999.png").write_bytes(b"not a png")  # a corrupt sample is skipped and counted
    (folder / "999.txt").write_text("broken")
    return folder


def run_tiny(stage: str, folder, tmp_path):
    cfg = load_config(f"tiny_{stage}", [
        f"checkpoint_path={tmp_path / 'ckpt'}", f"output_path={tmp_path / 'out'}", f"updates={STEPS}",
        "lr=0.002", "save_every=1000", "batch_size=8",
        f"data={{source: folder, paths: [{folder}], num_workers: 2, prefetch_batches: 1}}"])
    run = train(cfg, progress=False)
    losses = [h["loss"] for h in run.history]
    first, last = float(np.mean(losses[:6])), float(np.mean(losses[-6:]))
    print(f"tiny stage {stage}: mean loss of updates 1-6 {first:.4f}, of {STEPS - 5}-{STEPS} {last:.4f}; "
          f"{run.history[-1]['steps_per_s']:.2f} steps/s; skipped "
          f"{ {k: v for k, v in run.history[-1].items() if k.startswith('skipped_') and v} }")
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert last < 0.8 * first
    return run


@pytest.mark.parametrize("stage", ["c", "b"])
def test_tiny_stage_learns_and_exports(stage, image_folder, tmp_path):
    run = run_tiny(stage, image_folder, tmp_path)
    assert sum(v for k, v in run.history[-1].items() if k.startswith("skipped_")) >= 1
    exported = export_run(run, tmp_path / "export")
    model_dir, safetensors_file = exported["generator"]
    trained = generator_arrays(run.graphdef, run.state.params, run.frozen)
    loaded = named_variables(load_model(model_dir))
    assert set(loaded) == set(trained)
    for key, var in loaded.items():
        np.testing.assert_array_equal(np.asarray(var[...]), trained[key], err_msg=key)
    with safe_open(str(safetensors_file), "np") as f:
        assert set(f.keys()) == set(trained)  # official names


# The other two sources, Stage C only, on one device: WebDataset shards through train(), then a TFDS
# dataset through the Grain loader into the same compiled step (a second train() would compile it
# again for 19 s of CPU; Stage B's step takes 28 s).
SOURCE_STEPS = 24


def source_config(data: str, tmp_path):
    return load_config("tiny_c", [f"checkpoint_path={tmp_path / 'ckpt'}", f"output_path={tmp_path / 'out'}",
                                  f"updates={SOURCE_STEPS}", "lr=0.002", "save_every=1000", "batch_size=8",
                                  f"data={{{data}, num_workers: 2, prefetch_batches: 1}}"])


def first_last(source: str, losses) -> tuple[float, float]:
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    print(f"tiny stage c from {source}: mean loss of updates 1-5 {first:.4f}, of {SOURCE_STEPS - 4}-{SOURCE_STEPS} "
          f"{last:.4f}")
    assert len(losses) == SOURCE_STEPS and np.all(np.isfinite(losses))
    return first, last


def test_tiny_stage_c_learns_from_shards_and_tfds(tmp_path):
    write_shards(tmp_path / "shards", n_shards=3, per_shard=8)  # 24 samples, jpg/png/webp, four aspect ratios
    cfg = source_config(f"source: webdataset, paths: ['{tmp_path}/shards/shard-*.tar']", tmp_path / "wds")
    run = train(cfg, mesh=make_mesh(devices=jax.devices()[:1]), progress=False)
    first, last = first_last("webdataset", [h["loss"] for h in run.history])
    assert last < 0.8 * first  # measured: 1.8676 -> 1.0097

    data_dir = write_tfds(tmp_path / "tfds", n=24)
    cfg = source_config(f"source: tfds, tfds_name: {TFDS_NAME}, tfds_data_dir: '{data_dir}', image_key: picture, "
                        "caption_key: meta/text", tmp_path / "tfds_run")
    fresh, data = build_run(cfg, mesh=run.mesh), make_data_iterator(cfg)
    fresh.compiled = run.compiled  # same shapes, same program
    losses = [float(fresh.step(global_batch(fresh.task.host_batch(cfg, next(data), host_rng(cfg, step)),
                                            fresh.mesh))["loss"]) for step in range(SOURCE_STEPS)]
    assert len(fresh.compiled) == 1
    first, last = first_last("tfds", losses)
    assert last < 0.8 * first  # measured (through train()): 1.8702 -> 1.0088
