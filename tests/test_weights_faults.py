"""Faults of the converter, load_model and the converted-weights cache, met as a hostile user would meet
them: each reproduced and shown handled. All on a tiny Stage A (a few hundred kB)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from cascade_jax.models.random_init import random_model
from cascade_jax.models.registry import abstract_model, load_config
from cascade_jax.nn.params import named_variables
from cascade_jax.pipelines import loading
from cascade_jax.storage import atomic
from cascade_jax.weights import cache, checkpoint
from cascade_jax.weights.checkpoint import META_FILE, CheckpointError, load_model
from cascade_jax.weights.export import export_official
from cascade_jax.weights.safetensors_io import SafetensorsError, SafetensorsReader, save_safetensors
from cascade_jax.weights.sources import open_source

REPO = Path(__file__).resolve().parents[1]
MODEL, CONFIG = loading.pipeline_set("tiny")["stage_a"]


def arrays_of(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in named_variables(model).items()}


def save_random(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    arrays = arrays_of(random_model(MODEL, CONFIG, seed=seed))
    checkpoint.save(folder, {"model": MODEL, "config": CONFIG, "dtype": "float32"}, arrays)
    return arrays


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An official-format Stage A file, and a YAML config for it, side by side."""
    root = tmp_path_factory.mktemp("source")
    save_random(root / "converted")
    export_official(root / "converted", root / "stage_a.safetensors")
    (root / "stage_a.yaml").write_text(yaml.safe_dump({"model": MODEL, "config": CONFIG}))
    return root


@pytest.fixture(scope="module")
def convert_main():
    spec = importlib.util.spec_from_file_location("convert_script", REPO / "convert" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_convert(convert_main, source, output, *extra):
    return convert_main(["--model", MODEL, "--config", str(source / "stage_a.yaml"),
                         "--input", str(source / "stage_a.safetensors"), "--output", str(output), *extra])


# ---- 1. --overwrite deletes only what convert wrote ------------------------------------------------------

def test_overwrite_refuses_the_working_directory_and_foreign_folders(convert_main, source, tmp_path, monkeypatch,
                                                                      capsys):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    save_random(work / "models" / "other")
    monkeypatch.chdir(work)
    assert run_convert(convert_main, source, ".", "--overwrite") == 2
    assert "not a converted model directory" in capsys.readouterr().err
    assert run_convert(convert_main, source, work / "models", "--overwrite") == 2  # a parent of models
    assert (work / "keep.txt").read_text() == "mine" and (work / "models" / "other" / META_FILE).is_file()

    (work / "models" / "other" / "notes.txt").write_text("also mine")  # a converted dir with foreign files
    assert run_convert(convert_main, source, work / "models" / "other", "--overwrite") == 2
    assert "files convert did not write" in capsys.readouterr().err
    assert (work / "models" / "other" / "notes.txt").is_file()


def test_overwrite_replaces_a_converted_directory_atomically(convert_main, source, tmp_path):
    out = tmp_path / "out"
    save_random(out, seed=5)  # an older conversion of other weights
    assert run_convert(convert_main, source, out) == 2  # exists, no --overwrite
    assert run_convert(convert_main, source, out, "--overwrite") == 0
    expected = arrays_of(load_model(source / "converted"))
    got = arrays_of(load_model(out))
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old copy left beside it


def test_unwritable_output_is_refused_before_converting(convert_main, source, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert run_convert(convert_main, source, tmp_path / "a_file" / "out") == 2
    assert "not a writable folder" in capsys.readouterr().err


# ---- 2. safetensors headers are validated; pickles are named, never loaded --------------------------------

def write_with_header(path: Path, header, data: bytes):
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture
def valid_file(tmp_path) -> tuple[Path, dict, bytes]:
    path = tmp_path / "ok.safetensors"
    save_safetensors(path, {"clf.1.weight": np.ones((4, 4), np.float32), "clf.1.bias": np.zeros(4, np.float32)})
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return path, json.loads(path.read_bytes()[8:8 + n]), path.read_bytes()[8 + n:]


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["clf.1.bias"].update(data_offsets=[-64, 0]), "tensor 'clf.1.bias'.*non-negative"),
    (lambda h: h["clf.1.bias"].update(data_offsets=h["clf.1.weight"]["data_offsets"][:1] * 2), "clf.1.bias"),
    (lambda h: h["clf.1.bias"].update(data_offsets=[0, 16]), "overlaps"),
    (lambda h: h["clf.1.bias"].pop("data_offsets"), "tensor 'clf.1.bias'.*data_offsets"),
    (lambda h: h["clf.1.bias"].update(shape=[-4]), "tensor 'clf.1.bias'.*shape"),
    (lambda h: h["clf.1.bias"].update(shape=[True]), "tensor 'clf.1.bias'.*shape"),
    (lambda h: h.update({"a": 5}), "tensor 'a'.*not an object"),
    (lambda h: h.update({"__metadata__": {"x": [1]}}), "__metadata__"),
])
def test_malformed_headers_are_one_clear_error(valid_file, edit, message):
    path, header, data = valid_file
    edit(header)
    write_with_header(path, header, data)
    with pytest.raises(SafetensorsError, match=f"(?s){path.name}.*{message}"):
        SafetensorsReader(path)


def test_headers_that_are_not_objects_or_too_deep(valid_file):
    path, _, data = valid_file
    for header in ([1, 2, 3], b"[" * 100_000 + b"]" * 100_000):
        write_with_header(path, header, data)
        with pytest.raises(SafetensorsError, match=path.name):
            SafetensorsReader(path)
    write_with_header(path, {}, data)  # data bytes that no tensor owns
    with pytest.raises(SafetensorsError, match="belong to no tensor"):
        SafetensorsReader(path)


def test_pytorch_pickles_are_recognised_and_never_loaded(tmp_path):
    zipped, pickled, renamed = tmp_path / "model.ckpt", tmp_path / "model.pt", tmp_path / "weights.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    pickled.write_bytes(b"\x80\x02" + b"\0" * 64)
    renamed.write_bytes(b"\x80\x04" + b"\0" * 64)
    for path in (zipped, pickled, renamed):
        with pytest.raises(SafetensorsError, match=r"(?s)never loaded.*safetensors.torch import save_file"):
            open_source(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(FileNotFoundError, match="PyTorch pickles"):
        open_source(folder)


# ---- 3. interrupted saves leave nothing behind -----------------------------------------------------------

# Each child restores Python's Ctrl-C handler first: a child of a background job (a CI runner, `cmd &`)
# inherits SIGINT ignored, and would then never see the interrupt these tests send.
SAVE_AND_INTERRUPT = """
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
from cascade_jax.weights import checkpoint

real = checkpoint._host_array_checkpointer
how = sys.argv[2]

class Interrupting:
    def __init__(self):
        self.inner = real()
    def save(self, path, args):
        print("saving", flush=True)
        sig = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}[how]
        threading.Timer(0.05, os.kill, (os.getpid(), sig)).start()  # while the writer threads run
        self.inner.save(path, args)
        time.sleep(60)  # the signal always arrives before the rename
    def close(self):
        self.inner.close()

checkpoint._host_array_checkpointer = Interrupting
arrays = {f"w{i}": np.full((1024, 1024), i, np.float32) for i in range(24)}
checkpoint.save(sys.argv[1], {"model": "stage_a", "config": {}, "dtype": "float32"}, arrays)
"""


@pytest.mark.parametrize("how", ["INT", "TERM", "KILL"])
def test_interrupted_save_leaves_no_temp_directory(tmp_path, how):
    out = tmp_path / "models" / "out"
    result = subprocess.run([sys.executable, "-c", SAVE_AND_INTERRUPT, str(out), how], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert "saving" in result.stdout and result.returncode != 0, result.stderr[-2000:]
    left = sorted(p.name for p in out.parent.iterdir())
    if how == "KILL":  # nothing can clean up after kill -9: the next save into the folder does
        assert len(left) == 1 and left[0].startswith(".out.tmp-"), left
        save_random(out)
        left = sorted(p.name for p in out.parent.iterdir())
        assert left == ["out"], left
    else:
        assert left == [], left


EXPORT_AND_INTERRUPT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
from cascade_jax.weights.safetensors_io import write_safetensors

def fetch(key):
    if key == "t3":
        print("writing", flush=True)
        os.kill(os.getpid(), getattr(signal, "SIG" + sys.argv[2]))
        time.sleep(60)
    return np.zeros((256, 256), np.float32)

write_safetensors(sys.argv[1], [(f"t{i}", np.float32, (256, 256)) for i in range(8)], fetch)
"""


@pytest.mark.parametrize("how", ["INT", "TERM"])
def test_interrupted_export_leaves_no_partial_file(tmp_path, how):
    result = subprocess.run([sys.executable, "-c", EXPORT_AND_INTERRUPT, str(tmp_path / "out.safetensors"), how],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "writing" in result.stdout and result.returncode != 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic.write_text(path, "old")
    atomic.write_text(path, "new")
    assert path.read_text() == "new"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(path, "lost")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp left


def test_replacing_a_folder_publishes_whole_or_keeps_the_old_one(tmp_path):
    target = tmp_path / "weights"
    for version in ("old", "new"):
        with atomic.replacing(target, fsync=True) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text(version)
    assert (target / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError, match="failed midway"):
        with atomic.replacing(target) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("partial")
            raise RuntimeError("failed midway")
    assert (target / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["weights"]
    names = []  # a thread writes into a temp name of its own, which stale-temp cleanup still recognises
    thread = threading.Thread(target=lambda: names.append(atomic.temp_path(target).name))
    thread.start()
    thread.join()
    assert names[0] != atomic.temp_path(target).name and atomic._TEMP.match(names[0])["name"] == "weights"


def test_stale_temps_of_live_processes_and_other_names_are_kept(tmp_path):
    live = atomic.temp_path(tmp_path / "out")  # this process: alive
    other = tmp_path / f".other.tmp-{atomic._host()}-999999999"
    live.mkdir()
    other.mkdir()
    assert atomic.remove_stale_temps(tmp_path, "out") == []
    assert live.exists() and other.exists()
    assert atomic.remove_stale_temps(tmp_path) == [other]


# ---- 4. two processes converting into the same cache entry -----------------------------------------------

CONVERT_CACHED = """
import os, sys, time, zlib
import numpy as np
from pathlib import Path
from cascade_jax.pipelines import loading
from cascade_jax.weights.cache import cached_model
from cascade_jax.weights.convert import convert_checkpoint
from cascade_jax.nn.params import named_variables
model, config = loading.pipeline_set("tiny")["stage_a"]
src, rendezvous = Path(sys.argv[1]), Path(sys.argv[2])
(rendezvous / f"ready-{os.getpid()}").touch()
while len(list(rendezvous.glob("ready-*"))) < 2:  # start together, whatever the import times
    time.sleep(0.01)

def convert(entry):
    print("converted", flush=True)
    time.sleep(1.0)  # keep the window wide open for the other process
    convert_checkpoint(model, config, src, entry, dtype="float32", overwrite=True)

loaded = cached_model(src, "stage_a", "float32", config, convert)
print("crc", sum(zlib.crc32(np.asarray(v.get_value()).tobytes()) for v in named_variables(loaded).values()))
"""


def test_concurrent_first_use_converts_once_and_both_load(source, tmp_path):
    env = {**os.environ, "CASCADE_JAX_CACHE": str(tmp_path / "cache")}
    children = [subprocess.Popen([sys.executable, "-c", CONVERT_CACHED, str(source / "stage_a.safetensors"),
                                  str(tmp_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
                for _ in range(2)]
    outputs = [child.communicate(timeout=180) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in outputs]
    assert sum(out.count("converted") for out, _ in outputs) == 1
    crcs = {line for out, _ in outputs for line in out.splitlines() if line.startswith("crc")}
    assert len(crcs) == 1
    assert any("waiting for another process" in err for _, err in outputs)


# ---- 5. corruption is detected; damaged cache entries are rebuilt ------------------------------------------

def largest_data_file(model_dir: Path) -> Path:
    return max((p for p in (model_dir / checkpoint.WEIGHTS_DIR).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_converted_checkpoint_are_detected(tmp_path):
    save_random(tmp_path / "m")
    target = largest_data_file(tmp_path / "m")
    flip_byte(target, target.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_model(tmp_path / "m")
    load_model(tmp_path / "m", verify=False)  # the opt-out loads what is there


def test_a_damaged_cache_entry_is_rebuilt_with_a_message(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    src = source / "stage_a.safetensors"
    conversions = []

    def convert(entry):
        conversions.append(entry)
        loading.convert_checkpoint(MODEL, CONFIG, src, entry, dtype="float32", overwrite=True)

    expected = arrays_of(cache.cached_model(src, "stage_a", "float32", CONFIG, convert))
    entry = conversions[0]
    target = largest_data_file(entry)
    flip_byte(target, target.stat().st_size // 2)
    rebuilt = arrays_of(cache.cached_model(src, "stage_a", "float32", CONFIG, convert))
    assert len(conversions) == 2 and "damaged" in capsys.readouterr().err
    assert all(np.array_equal(rebuilt[k], expected[k]) for k in expected)


# ---- 10. unclear errors become one message naming the file or key ----------------------------------------

def edit_meta(model_dir: Path, change):
    path = model_dir / META_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / META_FILE).write_text('{"model": "stage_a", "conf'), "is damaged"),
    (lambda d: (d / META_FILE).write_text("[1, 2]"), "is damaged"),
    (lambda d: edit_meta(d, lambda m: m.update(format_version=99)), "format_version 99 is newer"),
    (lambda d: edit_meta(d, lambda m: m.pop("format_version")), "format_version"),
    (lambda d: edit_meta(d, lambda m: m.pop("config")), "'config' is missing"),
    (lambda d: (d / checkpoint.WEIGHTS_DIR / "_METADATA").unlink(), "_METADATA is missing"),
    (lambda d: edit_meta(d, lambda m: m.pop("file_sizes")) or (d / checkpoint.WEIGHTS_DIR / "_METADATA").unlink(),
     "Orbax checkpoint metadata"),  # a version-1 directory (no file sizes) without Orbax metadata
])
def test_damaged_model_directories_name_the_file(tmp_path, damage, message):
    save_random(tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "m")


def test_a_truncated_file_is_one_message_not_a_burst_of_event_loop_tracebacks(tmp_path, capfd):
    save_random(tmp_path / "m")
    target = largest_data_file(tmp_path / "m")
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{target.name} has 100 bytes"):
        load_model(tmp_path / "m")
    assert "Event loop is closed" not in capfd.readouterr().err


def test_unknown_sharding_value_is_named(tmp_path):
    save_random(tmp_path / "m")
    # A string is a mesh spec ("data=2,fsdp=4"); a bad one names itself and the expected form.
    with pytest.raises(ValueError, match="mesh 'nonsense': expected comma-separated AXIS=SIZE"):
        load_model(tmp_path / "m", sharding="nonsense")
    with pytest.raises(TypeError, match="sharding=42 is not understood"):
        load_model(tmp_path / "m", sharding=42)


@pytest.mark.parametrize("change, message", [
    ({"c_hidden": "32"}, r"c_hidden='32' is not accepted \('32' is not an integer\); c_hidden takes an integer"),
    ({"c_hidden": True}, r"c_hidden=True is not accepted \(True is not an integer\)"),
    ({"levels": 2.5}, r"levels=2.5 is not accepted \(2.5 is not an integer\)"),
    ({"colour": 1}, r"unknown config keys \['colour'\]"),
])
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        abstract_model(MODEL, {**CONFIG, **change})


def test_stage_c_config_errors_name_the_key():
    model, config = loading.pipeline_set("tiny")["stage_c"]
    for change, message in [({"c_cond": "64"}, "c_cond='64' is not accepted"),
                            ({"c_hidden": 64}, r"c_hidden=64 is not accepted \(64 is not a list\)"),
                            ({"c_hidden": [64, 64, 64]}, r"nhead=\[2, 2\] is not accepted \(it has 2 entries; c_hidden "
                                                         "has 3 levels, so 3 are needed"),
                            ({"blocks": [[1, 2]]}, r"blocks takes \[down, up\]: two lists of integers")]:
        with pytest.raises(ValueError, match=message):
            abstract_model(model, {**config, **change})


def test_yaml_syntax_errors_name_the_file(tmp_path, convert_main, source, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: stage_a\nconfig: {levels: [2\n")
    with pytest.raises(ValueError, match=f"{bad}: not valid YAML"):
        load_config(str(bad))
    assert convert_main(["--model", MODEL, "--config", str(bad), "--input", str(source / "stage_a.safetensors"),
                         "--output", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_index_json_may_not_name_shards_outside_its_folder(tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    with pytest.raises(ValueError, match="outside the index's folder"):
        open_source(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid shard index"):
        open_source(folder)


def test_tokenizer_folder_is_per_user_and_not_a_planted_symlink(tmp_path, monkeypatch):
    if loading.openai_bpe_path() is None:
        pytest.skip("open_clip_torch (the CLIP BPE file) is not installed")
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    folder = loading.default_tokenizer_dir()
    assert folder.is_relative_to(tmp_path / "cache") and (folder / "vocab.json").is_file()
    planted = tmp_path / "planted"
    planted.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (planted / name).write_text("{}")
    atomic.remove(folder)
    folder.symlink_to(planted)
    again = loading.default_tokenizer_dir()
    assert again == folder and not again.is_symlink() and (again / "vocab.json").stat().st_size > 1000
