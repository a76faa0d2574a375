"""Export folders without training: who may replace one (checked before any compile), what a component
is (digests that match a copy and its released origin), and several weights folders as one pipeline.
The trained loop itself (train -> export -> sample) is tests/test_training_learn.py."""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest
from training_testing import quick_encoders, toy_config

from cascade_jax.models.random_init import random_model
from cascade_jax.nn.params import named_variables
from cascade_jax.pipelines import weight_folders
from cascade_jax.pipelines.loading import pipeline_set
from cascade_jax.pipelines.sources import resolve_source
from cascade_jax.sharding import make_mesh
from cascade_jax.training import build_run, cli, export_run, load_config
from cascade_jax.training.export_folder import check_export_folder, run_identity
from cascade_jax.training.stage_b import StageBTask
from cascade_jax.training.stage_c import StageCTask
from cascade_jax.training.task import RandomSource
from cascade_jax.weights import checkpoint
from cascade_jax.weights.components import (EXPORT_MANIFEST, component_digest, copy_tokenizer, copy_tree,
                                            read_export_manifest)
from cascade_jax.weights.convert import convert_checkpoint
from cascade_jax.weights.export import export_official


def save_random(folder, component="previewer", seed=0):
    model_name, config = pipeline_set("tiny")[component]
    arrays = {k: np.asarray(v[...]) for k, v in named_variables(random_model(model_name, config, seed=seed)).items()}
    checkpoint.save(folder, {"model": model_name, "config": config, "dtype": "float32"}, arrays)
    return folder


def fake_export(folder, cfg, entries=("stage_b", "stage_b.safetensors")):
    folder.mkdir(parents=True)
    for name in entries:
        (folder / name).write_text("x")
    (folder / EXPORT_MANIFEST).write_text(json.dumps({"run": run_identity(cfg), "entries": list(entries)}))
    return folder


def test_an_export_replaces_only_this_runs_earlier_export(tmp_path):
    cfg = toy_config(tmp_path)
    assert check_export_folder(tmp_path / "new" / "export", cfg) == (tmp_path / "new" / "export").resolve()
    (tmp_path / "empty").mkdir()
    check_export_folder(tmp_path / "empty", cfg)
    user = tmp_path / "user"
    user.mkdir()
    (user / "generator.safetensors").write_bytes(b"the user's own weights")
    with pytest.raises(FileExistsError, match="already holds generator.safetensors, which no export of this run"):
        check_export_folder(user, cfg)
    ours = fake_export(tmp_path / "ours", cfg)
    check_export_folder(ours, cfg)  # this run's earlier export: replaced whole
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds notes.txt beside this run's earlier export"):
        check_export_folder(ours, cfg)
    other = fake_export(tmp_path / "other", toy_config(tmp_path / "elsewhere"))
    with pytest.raises(FileExistsError, match="holds the export of another run .*--weights C_EXPORT --weights B_EXPORT"):
        check_export_folder(other, cfg)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        check_export_folder(tmp_path / "a_file", cfg)


def test_the_trainer_refuses_a_users_folder_before_building_anything(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "generator.safetensors").write_bytes(b"the user's own weights")
    start = time.perf_counter()
    rc = cli.main(["tiny_b", f"checkpoint_path={tmp_path / 'ckpt'}", f"output_path={tmp_path / 'out'}",
                   "--export", str(user)], "b")
    seconds = time.perf_counter() - start
    assert rc == 2 and "generator.safetensors" in capsys.readouterr().err
    assert seconds < 5, seconds  # no model built, nothing compiled
    assert not (tmp_path / "ckpt").exists() and (user / "generator.safetensors").read_bytes() == b"the user's own weights"


def test_the_same_encoders_setting_gives_every_task_the_same_encoders(tmp_path):
    """Seeded by the component's place in the set: not by the task, its order of frozen models or its seed."""
    cfg_c = toy_config(tmp_path, stage="c", encoders="tiny", seed=1)
    cfg_b = toy_config(tmp_path, stage="b", encoders="tiny", seed=7)
    sources_c, sources_b = StageCTask().frozen_sources(cfg_c, tmp_path), StageBTask().frozen_sources(cfg_b, tmp_path)
    for name in ("text_encoder", "effnet"):
        assert sources_c[name] == sources_b[name] == RandomSource("tiny", name)
    # As StableCascadePipeline.random("tiny") seeds it: seed = the component's place in the set.
    previewer = named_variables(RandomSource("tiny", "previewer").model())
    place = list(pipeline_set("tiny")).index("previewer")
    same = named_variables(random_model(*pipeline_set("tiny")["previewer"], seed=place))
    assert all(np.array_equal(np.asarray(previewer[k][...]), np.asarray(same[k][...])) for k in same)


def test_a_copy_and_a_conversion_of_released_weights_are_that_component(tmp_path):
    random_dir = save_random(tmp_path / "random")
    assert component_digest(copy_tree(random_dir, tmp_path / "copy")) == component_digest(random_dir)
    assert component_digest(save_random(tmp_path / "other", seed=1)) != component_digest(random_dir)
    released = export_official(random_dir, tmp_path / "previewer.safetensors")  # stands for a released file
    model_name, config = pipeline_set("tiny")["previewer"]
    converted = convert_checkpoint(model_name, config, released, tmp_path / "converted")
    assert component_digest(converted) == component_digest(released)  # what a trainer's export copies
    tokenizer = tmp_path / "text_model"  # a transformers folder: tokenizer files beside the weights
    tokenizer.mkdir()
    for name, text in (("vocab.json", "{}"), ("merges.txt", "#version: 0.2\n"), ("model.safetensors", "big")):
        (tokenizer / name).write_text(text)
    copied = copy_tokenizer(tokenizer, tmp_path / "tokenizer")
    assert sorted(p.name for p in copied.iterdir()) == ["merges.txt", "vocab.json"]
    assert component_digest(copied) == component_digest(tokenizer)


def test_several_folders_each_give_what_they_hold(tmp_path, monkeypatch):
    first, second = tmp_path / "c_export", tmp_path / "b_export"
    save_random(first / "previewer")
    copy_tree(first / "previewer", second / "previewer")  # the same component twice: fine
    save_random(second / "stage_a", "stage_a")
    roots = weight_folders.resolve_roots([first, second], (), lite=False, dtype="float32")
    assert weight_folders.locate(roots, "previewer", False, "float32") == (first / "previewer", True)
    assert weight_folders.locate(roots, "stage_a", False, "float32") == (second / "stage_a", True)
    assert weight_folders.locate(roots, "effnet", False, "float32") is None
    (first / EXPORT_MANIFEST).write_text(json.dumps({"trained": "stage_c"}))
    message = weight_folders.missing_messages(roots, ["stage_b", "stage_a"], False)
    assert "no weights for stage_b, stage_a" in message and "an export of stage_c" in message
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder.*A trainer's export holds the tokenizer"):
        weight_folders.tokenizer_folder(roots)
    with pytest.raises(ValueError, match="given more than once"):
        weight_folders.resolve_roots([first, first], (), lite=False, dtype="float32")
    with pytest.raises(FileNotFoundError, match="no such folder"):  # plainly local: no download attempted
        resolve_source(str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    for local in ("./missing_export", "c_export/missing"):  # not Hugging Face ids 'org/name'
        with pytest.raises(FileNotFoundError, match="no such folder"):
            resolve_source(local)


def test_an_lcm_students_export_names_its_teacher_but_leaves_it_out(tmp_path):
    """A frozen model that is no pipeline component (the LCM teacher) does not land in the weights folder."""
    import cascade_jax.training.lcm  # noqa: F401  (registers stage c_lcm)

    cfg = load_config("tiny_c", [f"checkpoint_path={tmp_path / 'ck'}", f"output_path={tmp_path / 'out'}",
                                 "stage=c_lcm", "dropout=false", "lcm={student: full}",
                                 f"encoders={quick_encoders(tmp_path)}"])
    exported = export_run(build_run(cfg, mesh=make_mesh(devices=jax.devices()[:1])), tmp_path / "export")
    assert exported["generator"][0] == (tmp_path / "export" / "stage_c").resolve()
    manifest = read_export_manifest(tmp_path / "export")
    assert manifest["not_exported"] == ["teacher"] and not (tmp_path / "export" / "teacher").exists()
    assert set(manifest["components"]) == {"stage_c", "effnet", "text_encoder", "image_encoder", "previewer",
                                           "tokenizer"}
