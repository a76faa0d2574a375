"""The converter, converted directories, export and their error handling (previewer fixture: small)."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import cascade_jax
from cascade_jax.sharding import make_mesh
from cascade_jax.weights.checkpoint import read_meta
from cascade_jax.weights.convert import ConversionError, convert_checkpoint
from cascade_jax.weights.export import export_official
from cascade_jax.weights.safetensors_io import SafetensorsError, SafetensorsReader, save_safetensors
from helpers import REPO, fixture, nchw_to_nhwc, nhwc_to_nchw, relative_error


@pytest.fixture(scope="module")
def previewer(fixtures_dir):
    return fixture(fixtures_dir, "previewer")


def _same_files(a, b):
    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    assert sorted(ra.keys()) == sorted(rb.keys())
    for k in ra.keys():
        assert ra.dtype(k) == rb.dtype(k) and ra.shape(k) == rb.shape(k), k
        assert ra.get(k).tobytes() == rb.get(k).tobytes(), f"{k} differs after the round trip"


def test_convert_load_run_export_roundtrip(previewer, tmp_path):
    config, io, weights = previewer
    out = convert_checkpoint("previewer", config["config"], weights, tmp_path / "pv")
    assert read_meta(out)["source"]["format"] == "official"
    model = cascade_jax.load_model(out)
    err = relative_error(nhwc_to_nchw(model(nchw_to_nhwc(io["latent"]))), io["out"])
    assert err <= 1e-4, err
    export_official(out, tmp_path / "pv.safetensors")
    _same_files(weights, tmp_path / "pv.safetensors")


def test_bfloat16_conversion_and_load_override(previewer, tmp_path):
    config, _, weights = previewer
    out = convert_checkpoint("previewer", config["config"], weights, tmp_path / "pv16", dtype="bfloat16")
    model = cascade_jax.load_model(out)
    assert model.blocks[0].weight.dtype == jax.numpy.bfloat16
    assert model.blocks[2].running_var.dtype == jax.numpy.float32  # statistics stay float32
    assert cascade_jax.load_model(out, dtype="float32").blocks[0].weight.dtype == jax.numpy.float32


def test_restore_straight_into_a_mesh(previewer, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    config, io, weights = previewer
    out = convert_checkpoint("previewer", config["config"], weights, tmp_path / "pv")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = cascade_jax.load_model(out, sharding=mesh)
    w = model.blocks[3].weight  # (3, 3, 32, 32) conv: in -> fsdp, out -> tensor
    assert w[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
    assert len(w[...].addressable_shards) == 8
    err = relative_error(nhwc_to_nchw(model(nchw_to_nhwc(io["latent"]))), io["out"])
    assert err <= 1e-4, err


def test_truncated_file_is_refused_and_nothing_written(previewer, tmp_path):
    config, _, weights = previewer
    data = weights.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="truncated"):
        convert_checkpoint("previewer", config["config"], bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        convert_checkpoint("previewer", config["config"], junk, tmp_path / "out")
    assert list(tmp_path.iterdir()) == sorted([bad, junk]) or set(tmp_path.iterdir()) == {bad, junk}


def test_wrong_model_for_file_lists_tensors(previewer, fixtures_dir, tmp_path):
    _, _, weights = previewer
    stage_a_config = fixture(fixtures_dir, "stage_a")[0]["config"]
    with pytest.raises(ConversionError) as info:
        convert_checkpoint("stage_a", stage_a_config, weights, tmp_path / "out")
    message = str(info.value)
    assert "missing" in message and "in_block.1.weight" in message
    assert "not used" in message and "blocks.0.weight" in message
    assert not (tmp_path / "out").exists()


def test_wrong_config_names_shapes(previewer, tmp_path):
    config, _, weights = previewer
    with pytest.raises(ConversionError, match=r"blocks\.0\.weight: file \(32, 16, 1, 1\), model expects \(64, 16, 1, 1\)"):
        convert_checkpoint("previewer", {**config["config"], "c_hidden": 64}, weights, tmp_path / "out")
    with pytest.raises(ValueError, match="does not fit model 'previewer'"):
        convert_checkpoint("previewer", {"c_hiden": 32}, weights, tmp_path / "out")
    with pytest.raises(ValueError, match="is for model 'stage_c'"):
        convert_checkpoint("previewer", "stage_c", weights, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float16_refused_and_existing_output_kept(previewer, tmp_path):
    config, _, weights = previewer
    with pytest.raises(ValueError, match="float16 is not supported"):
        convert_checkpoint("previewer", config["config"], weights, tmp_path / "out", dtype="float16")
    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        convert_checkpoint("previewer", config["config"], weights, keep)
    assert (keep / "precious.txt").read_text() == "user data"


def test_mismatched_extra_tensor_is_an_error(previewer, tmp_path):
    config, _, weights = previewer
    reader = SafetensorsReader(weights)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    tensors["blocks.99.weight"] = np.zeros(3, np.float32)
    extra = tmp_path / "extra.safetensors"
    save_safetensors(extra, tensors)
    with pytest.raises(ConversionError, match=r"1 tensors are not used by the model:\s+blocks\.99\.weight"):
        convert_checkpoint("previewer", config["config"], extra, tmp_path / "out")


def test_command_line_convert_and_export(previewer, tmp_path):
    config, _, weights = previewer
    cfg_file = tmp_path / "previewer.json"
    cfg_file.write_text(__import__("json").dumps(config["config"]))
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "convert" / "convert.py"), *a],
                                    capture_output=True, text=True)
    ok = run("--model", "previewer", "--config", str(cfg_file), "--input", str(weights), "--output", str(tmp_path / "d"))
    assert ok.returncode == 0, ok.stderr
    again = run("--model", "previewer", "--config", str(cfg_file), "--input", str(weights), "--output", str(tmp_path / "d"))
    assert again.returncode == 2 and "already exists" in again.stderr
    wrong = run("--model", "stage_a", "--config", str(cfg_file), "--input", str(weights), "--output", str(tmp_path / "e"))
    assert wrong.returncode == 2 and "error:" in wrong.stderr and "Traceback" not in wrong.stderr
    back = run("--export", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "back.safetensors"))
    assert back.returncode == 0, back.stderr
    _same_files(weights, tmp_path / "back.safetensors")
