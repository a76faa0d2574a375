"""The user's workflows with buckets (moto's S3 and gcp-storage-emulator on loopback): tiny Stage C trained
from WebDataset shards in s3:// with checkpoints, logs and the export in gs://; a trainer killed with SIGKILL
during a save to the bucket resumes from the last complete checkpoint, bit-identically; convert into a
bucket and load from it; from_pretrained reading only what it needs from a bucket; a LoRA from a bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_testing import write_shards
from storage_testing import FaultProxy, upload_folder
from test_pipeline_loading import (assert_same_weights, cache, check_pipeline, official_folder, tiny,  # noqa: F401
                                   tokenizer_dir)
from training_testing import ToyData, host_params, toy_config

from cascade_jax import storage
from cascade_jax.nn.params import named_variables
from cascade_jax.weights.checkpoint import load_model

HERE = Path(__file__).resolve().parent


def test_stage_c_trains_from_s3_shards_into_gs_and_its_export_loads_and_samples(object_stores, tmp_path,
                                                                                 monkeypatch):
    import jax

    from cascade_jax.diffusion import sample_with_settings
    from cascade_jax.pipelines import PRIOR_DEFAULTS
    from cascade_jax.training import load_config, train
    from cascade_jax.training.export import generator_arrays
    from cascade_jax.training.loop import build_run, checkpointer_for, export_run

    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    write_shards(tmp_path / "shards", 2, 4)
    s3, gs = object_stores.bucket("s3"), object_stores.bucket("gs")
    upload_folder(tmp_path / "shards", f"{s3}/laion")
    # As the released configs write it: webdataset_path a list of s3 prefixes, checkpoint_path in gs.
    cfg = load_config("tiny_c", [f"webdataset_path=['{s3}/laion']", f"checkpoint_path={gs}/ckpt",
                                 f"output_path={gs}/out", "updates=2", "save_every=1", "batch_size=8",
                                 "data={num_workers: 2}"])
    run = train(cfg, progress=False)
    listing = storage.listing(gs)
    assert {"ckpt/tiny_c/1/commit_success.txt", "ckpt/tiny_c/2/commit_success.txt"} <= set(listing)
    assert any(k.startswith("out/tiny_c/logs/events.out.tfevents") for k in listing)  # TensorBoard in the bucket
    # The checkpoint restores from the bucket bit for bit (what a resumed run starts from).
    fresh, checkpointer = build_run(cfg), checkpointer_for(cfg)
    try:
        state, data_state, _ = checkpointer.restore(2, fresh.state, fresh.state_shardings)
    finally:
        checkpointer.close()
    got, want = host_params(state), host_params(run.state)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert data_state["step"] == 2

    exported = export_run(run, f"{gs}/out/export")  # a complete weights folder in the bucket (training/export.py)
    assert exported["generator"][1] == f"{gs}/out/export/stage_c.safetensors"
    assert {"stage_c", "effnet", "text_encoder", "tokenizer", "cascade_export.json"} <= \
        {rel.split("/")[0] for rel in storage.listing(f"{gs}/out/export")}
    model = load_model(f"{gs}/out/export/stage_c")
    arrays = generator_arrays(run.graphdef, run.state.params, run.frozen)
    loaded = {k: np.asarray(v.get_value()) for k, v in named_variables(model).items()}
    assert loaded.keys() == arrays.keys() and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    conditions = {"clip_text": np.ones((1, 4, 32), np.float32), "clip_text_pooled": np.ones((1, 1, 32), np.float32),
                  "clip_img": np.zeros((1, 1, 24), np.float32)}
    uncond = {k: np.zeros_like(v) for k, v in conditions.items()}
    latents = sample_with_settings(lambda x, r, **c: model(x, r, **c), PRIOR_DEFAULTS.replace(steps=2), conditions,
                                   uncond, shape=(1, 4, 4, 16), key=jax.random.key(0)).x0
    assert latents.shape == (1, 4, 4, 16) and np.isfinite(np.asarray(latents)).all()


def _toy_trainer(checkpoint_url: str, log: Path, env: dict) -> subprocess.Popen:
    """training_testing's toy task (it compiles in a second) with its checkpoints in the bucket."""
    env = {**os.environ, **env, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(HERE / "storage_testing.py"), checkpoint_url, "8", str(log)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_during_a_save_to_a_bucket_resumes_from_the_last_complete_checkpoint(object_stores, tmp_path):
    gs = object_stores.bucket("gs")
    slow = FaultProxy(object_stores.gcs_endpoint)
    slow.write_delay_s = 0.15  # each upload of a save waits: the kill lands inside one
    log = tmp_path / "killed.log"
    proc = _toy_trainer(f"{gs}/run", log, {"STORAGE_EMULATOR_HOST": slow.endpoint})
    deadline, in_save = time.time() + 240, None
    while proc.poll() is None and time.time() < deadline and in_save is None:
        done = set(storage.listing(f"{gs}/run/toy")) if storage.isdir(f"{gs}/run/toy") else set()
        steps = {k.split("/")[0] for k in done if k.split("/")[0].isdigit()}
        complete = {s for s in steps if f"{s}/commit_success.txt" in done}
        in_save = next((s for s in steps - complete if complete), None)  # a save under way after a finished one
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    slow.stop()
    assert in_save is not None, f"no save was caught under way: {proc.stderr.read().decode()[-2000:]}"
    assert f"{in_save}/commit_success.txt" not in storage.listing(f"{gs}/run/toy"), "the kill came after the save"
    # Resumed here (the same trainer as the subprocess's, without a second process start-up).
    from cascade_jax.training import train

    resumed_data, resumed_steps = ToyData(8), []

    def record(info):
        resumed_steps.append(info.step)

    cfg = toy_config(tmp_path, checkpoint_path=f"{gs}/run", output_path=f"{gs}/run", updates=8, save_every=2,
                     keep_checkpoints=2)
    resumed = train(cfg, data=resumed_data, hooks=[record], progress=False)
    whole = train(toy_config(tmp_path, updates=8, save_every=2, keep_checkpoints=2), data=ToyData(8), progress=False)
    got, want = host_params(resumed.state), host_params(whole.state)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert resumed_data.position == 64
    killed_steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    start = resumed_steps[0] - 1  # the checkpoint it resumed from: complete, before the one cut short
    assert resumed_steps == list(range(start + 1, 9)) and 0 < start < int(in_save)
    assert set(killed_steps) | set(resumed_steps) == set(range(1, 9))  # no update was skipped


def test_convert_into_a_bucket_load_and_export_back(object_stores, tiny, tmp_path, monkeypatch):  # noqa: F811
    sys.path.insert(0, str(HERE.parent / "convert"))
    import convert as convert_script

    from cascade_jax.weights.export import export_official

    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    model_name, config, model, converted = tiny["stage_a"]
    export_official(converted, tmp_path / "stage_a.safetensors")
    s3, gs = object_stores.bucket("s3"), object_stores.bucket("gs")
    storage.upload(tmp_path / "stage_a.safetensors", f"{s3}/in/stage_a.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = ["--model", model_name, "--config", str(tmp_path / "config.json"), "--input", f"{s3}/in/stage_a.safetensors"]
    assert convert_script.main([*args, "--output", f"{gs}/models/stage_a"]) == 0
    assert_same_weights(load_model(f"{gs}/models/stage_a"), model, "stage_a")
    assert convert_script.main([*args, "--output", f"{gs}/models/stage_a"]) == 2  # exists: refused, kept
    assert convert_script.main([*args, "--output", f"{gs}/models/stage_a", "--overwrite"]) == 0
    assert convert_script.main([*args, "--output", f"{s3}/models/stage_a"]) == 2  # Orbax cannot write s3://
    assert not storage.exists(f"{s3}/models")
    assert convert_script.main(["--export", "--input", f"{gs}/models/stage_a", "--output", f"{s3}/a.safetensors"]) == 0
    assert storage.read_bytes(f"{s3}/a.safetensors") == (tmp_path / "stage_a.safetensors").read_bytes()


def test_from_pretrained_reads_only_what_it_needs_from_a_bucket(object_stores, official_folder, tiny,  # noqa: F811
                                                                cache, tmp_path):  # noqa: F811
    from cascade_jax.pipelines import StableCascadePipeline

    s3, gs = object_stores.bucket("s3"), object_stores.bucket("gs")
    upload_folder(official_folder, f"{s3}/stable-cascade")
    storage.write_bytes(f"{s3}/stable-cascade/stage_c_lite.safetensors", b"a variant nobody asked for")
    check_pipeline(StableCascadePipeline.from_pretrained(f"{s3}/stable-cascade", configs="tiny", dtype="float32"),
                   tiny)
    copies = {p.name for p in cache.rglob("*") if p.is_file()}
    assert "stage_c_lite.safetensors" not in copies and "stage_c.safetensors" in copies
    # Converted directories in a bucket (an export of this project) load the same way.
    for component, (_, _, _, converted) in tiny.items():
        upload_folder(converted, f"{gs}/weights/{component}")
    upload_folder(official_folder / "tokenizer", f"{gs}/weights/tokenizer")
    check_pipeline(StableCascadePipeline.from_pretrained(f"{gs}/weights", dtype="float32"), tiny)
    with pytest.raises(FileNotFoundError, match="the bucket gs://nothing-here-34 does not exist"):
        StableCascadePipeline.from_pretrained("gs://nothing-here-34/weights", dtype="float32")


def test_lora_from_a_bucket(object_stores, tiny, tmp_path, monkeypatch):  # noqa: F811
    from cascade_jax.models import lora as L
    from cascade_jax.pipelines.lora import parse_lora_spec
    from cascade_jax.weights.lora_files import load_lora, save_official

    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    stage_c = tiny["stage_c"][2]
    rng = np.random.default_rng(0)
    layers = {t.key: L.LayerFactors(rng.normal(size=(2, t.torch_dims()[1])).astype(np.float32),
                                    rng.normal(size=(t.torch_dims()[0], 2)).astype(np.float32))
              for t in L.lora_targets(stage_c)}
    bucket = object_stores.bucket("s3")
    save_official(f"{bucket}/loras/style.safetensors", L.LoRAWeights(layers))
    spec = parse_lora_spec(f"{bucket}/loras/style.safetensors:0.7")
    assert (spec.path, spec.strength) == (f"{bucket}/loras/style.safetensors", 0.7)
    lora = load_lora(spec.path, stage_c)
    assert list(lora.layers) == list(layers)
    from cascade_jax.pipelines.lora import apply_lora_file

    applied = apply_lora_file(L.shallow_copy(stage_c), spec, "style")  # what the pipeline and --lora call
    assert list(applied.layers) == list(layers)
    for key, factors in layers.items():
        assert np.array_equal(lora.layers[key].down, factors.down) and np.array_equal(lora.layers[key].up, factors.up)
