"""Tiny Stage C and Stage B runs learn from a folder dataset the test writes (through the Grain
loader, frozen random encoders, the full step), trained and exported by the trainer scripts' code; the
two exports sample together with generate.py and the Python API (the README's loop); tiny Stage C
also learns from WebDataset shards and from a TFDS dataset (the other two sources)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from data_testing import TFDS_NAME, write_shards, write_tfds
from PIL import Image
from safetensors import safe_open
from flax import nnx
from training_testing import ImageData, quick_encoders

import cascade_jax.training
from cascade_jax.data import global_batch
from cascade_jax.models.random_init import random_model
from cascade_jax.nn.params import named_variables, official_key
from cascade_jax.pipelines import StableCascadePipeline
from cascade_jax.pipelines.loading import pipeline_set
from cascade_jax.sharding import make_mesh
from cascade_jax.training import build_run, cli, export_run, load_config, train
from cascade_jax.training.export import generator_arrays
from cascade_jax.training.loop import host_rng, make_data_iterator
from cascade_jax.storage import atomic
from cascade_jax.weights import checkpoint
from cascade_jax.weights.checkpoint import load_model
from cascade_jax.weights.components import copy_tree, read_export_manifest
from cascade_jax.weights.export import export_official

STEPS = 30
REPO = Path(__file__).resolve().parents[1]


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


def train_with_the_cli(stage: str, folder, work, encoders: str):
    """``python train/train_{stage}.py tiny_{stage} data=... --export DIR`` as the README says (in this process);
    returns the run the trainer built (its history holds the losses) and the export folder."""
    runs = {}

    def keep_run(cfg, **kwargs):
        runs["run"] = train(cfg, progress=False, **kwargs)
        return runs["run"]

    export = work / f"{stage}_export"
    argv = [f"tiny_{stage}", f"checkpoint_path={work / 'ckpt'}", f"output_path={work / 'out'}", f"updates={STEPS}",
            "lr=0.002", "save_every=1000", "batch_size=8",
            f"data={{source: folder, paths: [{folder}], num_workers: 2, prefetch_batches: 1}}", f"encoders={encoders}",
            "--export", str(export)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cascade_jax.training, "train", keep_run)
        assert cli.main(argv, stage) == 0
    run = runs["run"]
    losses = [h["loss"] for h in run.history]
    first, last = float(np.mean(losses[:6])), float(np.mean(losses[-6:]))
    print(f"tiny stage {stage}: mean loss of updates 1-6 {first:.4f}, of {STEPS - 5}-{STEPS} {last:.4f}; "
          f"{run.history[-1]['steps_per_s']:.2f} steps/s; skipped "
          f"{ {k: v for k, v in run.history[-1].items() if k.startswith('skipped_') and v} }")
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert last < 0.8 * first
    return run, export


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """Tiny Stage C and Stage B trained and exported by the trainer scripts' code, once for the module, with
    the tiny encoders but a narrow EfficientNet (``quick_encoders``: 14 s of CPU less, the same learning)."""
    work = tmp_path_factory.mktemp("runs")
    return {stage: train_with_the_cli(stage, image_folder, work, quick_encoders(work)) for stage in ("c", "b")}


@pytest.mark.parametrize("stage", ["c", "b"])
def test_tiny_stage_learns_and_exports(stage, trained, tmp_path):
    run, export = trained[stage]
    assert sum(v for k, v in run.history[-1].items() if k.startswith("skipped_")) >= 1
    component = f"stage_{stage}"
    trained_arrays = generator_arrays(run.graphdef, run.state.params, run.frozen)
    loaded = named_variables(load_model(export / component))
    assert set(loaded) == set(trained_arrays)
    for key, var in loaded.items():
        np.testing.assert_array_equal(np.asarray(var[...]), trained_arrays[key], err_msg=key)
    with safe_open(str(export / f"{component}.safetensors"), "np") as f:
        assert set(f.keys()) == set(trained_arrays)  # official names
        key = sorted(trained_arrays)[0]  # the trained (float32) weights, as convert.py --export writes them
        assert f.get_tensor(key).dtype == np.float32
    converted_back = export_official(export / component, tmp_path / "convert_export.safetensors")
    assert converted_back.read_bytes() == (export / f"{component}.safetensors").read_bytes()  # = convert.py --export
    frozen = {"c": {"effnet", "text_encoder", "image_encoder", "previewer"}, "b": {"stage_a", "effnet", "text_encoder"}}
    manifest = read_export_manifest(export)
    assert set(manifest["components"]) == {component, "tokenizer", *frozen[stage]}
    assert manifest["step"] == STEPS and manifest["run"]["stage"] == stage
    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
    for name in frozen[stage] & set(modules.names):  # the frozen parts as the run used them (float32 compute)
        copy = named_variables(load_model(export / name))
        used = nnx.state(getattr(modules, name))
        for path, var in nnx.to_flat_state(used):
            np.testing.assert_array_equal(np.asarray(copy[official_key(path)][...]), np.asarray(var[...]))


def generate_script():
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "sample" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trained_stages_sample_together_and_a_mixed_pair_is_refused(trained, tmp_path, monkeypatch):
    """The README's loop: the two exports as one pipeline, with generate.py and with the Python API."""
    (run_c, c_export), (_, b_export) = trained["c"], trained["b"]
    shared = {"effnet", "text_encoder", "tokenizer"}  # the same `encoders: tiny` in both trainers
    digests = [{k: v["digest"] for k, v in read_export_manifest(e)["components"].items()} for e in (c_export, b_export)]
    assert all(digests[0][k] == digests[1][k] for k in shared)

    built = []  # the pipeline generate.py builds, to call it from Python below with its compiled programs
    from_pretrained = StableCascadePipeline.from_pretrained.__func__
    monkeypatch.setattr(StableCascadePipeline, "from_pretrained",
                        classmethod(lambda cls, source, **kw: built.append((source, from_pretrained(cls, source, **kw)))
                                    or built[-1][1]))
    out = tmp_path / "samples"
    argv = ["text2img", "--weights", str(c_export), "--weights", str(b_export), "--prompt", "a red square",
            "--height", "64", "--width", "64", "--prior-steps", "2", "--decoder-steps", "2", "--out", str(out)]
    assert generate_script().main(argv) == 0
    with Image.open(out / "text2img_00_seed0.png") as image:
        assert image.size == (64, 64)

    source, pipe = built[0]  # StableCascadePipeline.from_pretrained([C_EXPORT, B_EXPORT])
    assert source == [str(c_export), str(b_export)]
    steps = []
    result = pipe("a blue square", height=64, width=64, prior_num_inference_steps=2, num_inference_steps=2,
                  generator=3, prior_callback_on_step_end=lambda p, i, t, kwargs: steps.append(("C", i, t)),
                  callback_on_step_end=lambda p, i, t, kwargs: steps.append(("B", i, t)))
    assert [image.size for image in result.images] == [(64, 64)] and result.seeds == [3]
    assert steps == [("C", 0, 1.0), ("C", 1, 0.5), ("B", 0, 1.0), ("B", 1, 0.5)]
    assert all(t.cached for t in result.timings.values())  # generate.py's programs: one code path

    mixed = tmp_path / "b_other_text_encoder"  # the B export with another text encoder than C's
    copy_tree(b_export, mixed)
    atomic.remove(mixed / "text_encoder")
    other = random_model(*pipeline_set("tiny")["text_encoder"], seed=99)
    checkpoint.save(mixed / "text_encoder", {"model": "clip_text", "config": pipeline_set("tiny")["text_encoder"][1],
                                            "dtype": "float32"},
                    {k: np.asarray(v[...]) for k, v in named_variables(other).items()})
    with pytest.raises(ValueError, match=r"^text_encoder: the weights folders hold different copies"):
        StableCascadePipeline.from_pretrained([c_export, mixed])

    # Exporting again into the run's own export replaces it whole; anything else there is refused by name.
    before = sorted(p.name for p in c_export.iterdir())
    assert export_run(run_c, c_export)["generator"][0] == c_export.resolve() / "stage_c"
    assert sorted(p.name for p in c_export.iterdir()) == before
    (c_export / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_run(run_c, c_export)


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
