"""Model-parallel sampling: the tiny random cascade (float32) on 8 virtual CPU devices with the trainer's
mesh axes and logical-axis rules gives the single-device result, its parameters laid out as the rules
say, and a converted directory restores straight into that layout.

One prompt pair at 4 images each (batch 8) at 96x128 (Stage C 3x3, Stage B 24x32), 2 steps per stage.
On fsdp=4,tensor=2 the batch is split 4 ways over fsdp and replicated over tensor; on data=2,fsdp=4 it is
split 8 ways (one image per device), as the trainer splits its batch. The 1e-5 bound is relative
(max|Δ| / max|ref|), as in test_pipeline.py: a sharded program sums in another order.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cascade_jax.nn.params import named_variables
from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS, StableCascadePipeline, loading
from cascade_jax.sharding import batch_axes, make_mesh, parse_mesh_spec
from cascade_jax.weights import checkpoint
from cascade_jax.weights.export import export_official

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

H, W = 96, 128
PRIOR = PRIOR_DEFAULTS.replace(steps=2)
DECODER = DECODER_DEFAULTS.replace(steps=2)
PROMPTS = ["a red cube on a table", "a blue ball"]
PER_PROMPT = 4
LATENT_TOL = 1e-5  # max|Δ| / max|ref|
PIXEL_TOL = 1  # uint8 levels: a rounding boundary


def t2i(pipe, **kwargs):
    return pipe.text_to_image(PROMPTS, height=H, width=W, num_images_per_prompt=PER_PROMPT, seed=7, prior=PRIOR,
                              decoder=DECODER, **kwargs)


def variables(model) -> dict:
    return {k: v.get_value() for k, v in named_variables(model).items()}


def stage_c_of(pipe):
    return nnx.merge(pipe.prior.graphdef, pipe.prior.state)


def stage_b_of(pipe):
    return nnx.merge(pipe.decoder.graphdef, pipe.decoder.state)


def relative(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope="module")
def reference():
    """Everything on one device (a 1-device mesh)."""
    return t2i(StableCascadePipeline.random("tiny", mesh=make_mesh(devices=jax.devices()[:1])))


# (mesh, {component: {variable: spec}}): a linear (in, out), a conv (kh, kw, in, out), a bias (out,).
LAYOUTS = {
    "fsdp=4,tensor=2": {
        "stage_c": {"clip_txt_mapper.weight": P("fsdp", "tensor"), "clf.1.weight": P(None, None, "fsdp", "tensor"),
                    "clip_txt_mapper.bias": P("tensor")},
        "stage_b": {"clip_mapper.weight": P("fsdp", "tensor")},
    },
    "data=2,fsdp=4": {
        "stage_c": {"clip_txt_mapper.weight": P("fsdp", None), "clf.1.weight": P(None, None, "fsdp", None),
                    "clip_txt_mapper.bias": P(None)},
        "stage_b": {"clip_mapper.weight": P("fsdp", None)},
    },
}


@pytest.mark.parametrize("spec", list(LAYOUTS))
def test_text_to_image_on_a_mesh_equals_one_device(spec, reference):
    pipe = StableCascadePipeline.random("tiny", mesh=spec)
    mesh = pipe.mesh
    assert dict(mesh.shape) == {k: (v if v != -1 else 1) for k, v in parse_mesh_spec(spec).items()}
    for component, model in (("stage_c", stage_c_of(pipe)), ("stage_b", stage_b_of(pipe))):
        arrays = variables(model)
        for key, want in LAYOUTS[spec][component].items():
            assert arrays[key].sharding.spec == want, f"{spec} {component}.{key}: {arrays[key].sharding.spec}"
            assert arrays[key].sharding.mesh.shape == mesh.shape
    c_weight = variables(stage_c_of(pipe))["clip_txt_mapper.weight"]
    shard_shapes = {s.data.shape for s in c_weight.addressable_shards}
    assert shard_shapes == {tuple(d // mesh.shape[a] if a else d for d, a in
                                  zip(c_weight.shape, (*c_weight.sharding.spec, None)))}
    # The encoders and Stage A are placed by the same rules (a sharded weight of each).
    text = nnx.merge(pipe.text._graphdef, pipe.text._state)
    assert any(a.sharding.spec and "fsdp" in a.sharding.spec for a in variables(text).values())
    assert any(a.sharding.spec and "fsdp" in a.sharding.spec for a in variables(pipe.stage_a).values())

    # The progress callback and Stage A's decoding on one mesh only (each costs compile time).
    full = spec == "fsdp=4,tensor=2"
    events = []
    out = t2i(pipe, callback=events.append if full else None, callback_x0=full, decode=full)
    batch = len(PROMPTS) * PER_PROMPT
    x0_sharding = next(iter(pipe.prior._compiled.values())).output_shardings[0]
    assert x0_sharding.spec[0] == batch_axes(mesh, batch) and x0_sharding.mesh.shape == mesh.shape
    if full:
        assert [(e.stage, e.step) for e in events] == [("Stage C", 1), ("Stage C", 2), ("Stage B", 1), ("Stage B", 2)]
        np.testing.assert_array_equal(events[1].x0, out.stage_c_latents)  # the callback saw every image whole
        pixels = int(np.max(np.abs(out.images.astype(int) - reference.images.astype(int))))
        assert pixels <= PIXEL_TOL, f"{spec}: pixels differ by {pixels} levels"

    for name in ("stage_c_latents", "stage_b_latents"):
        err = relative(getattr(out, name), getattr(reference, name))
        print(f"{spec} {name}: max|Δ|/max|ref| = {err:.2e}")
        assert err <= LATENT_TOL, f"{spec} {name}: {err:.2e}"
    assert relative(out.stage_c_latents[0], out.stage_c_latents[1]) > 0.01  # different seeds, different images


def test_batch_split_over_data_and_fsdp_else_data_else_replicated():
    mesh = make_mesh("data=2,fsdp=4")
    assert batch_axes(mesh, 8) == ("data", "fsdp") and batch_axes(mesh, 16) == ("data", "fsdp")
    assert batch_axes(mesh, 6) == ("data",) and batch_axes(mesh, 3) is None
    assert batch_axes(make_mesh("tensor=8"), 8) is None  # the tensor axis never splits the batch


def test_rules_decide_the_layout_and_a_rule_naming_no_mesh_axis_is_refused():
    pipe = StableCascadePipeline.random("tiny", mesh="fsdp=8", rules={"in": None, "out": "fsdp"})
    arrays = variables(stage_c_of(pipe))
    assert arrays["clip_txt_mapper.weight"].sharding.spec == P(None, "fsdp")
    assert arrays["clip_txt_mapper.bias"].sharding.spec == P("fsdp")
    pipe.load_loras([])  # a new Stage C runner (LoRAs merged) keeps the mesh and the rules
    assert pipe.prior.mesh is pipe.mesh and pipe.prior.rules == {"in": None, "out": "fsdp"}
    assert variables(stage_c_of(pipe))["clip_txt_mapper.weight"].sharding.spec == P(None, "fsdp")
    with pytest.raises(ValueError, match="sharding rule 'in' -> 'model': the mesh has no axis 'model'"):
        StableCascadePipeline.random("tiny", mesh="fsdp=8", rules={"in": "model"})


@pytest.mark.parametrize("spec, message", [
    ("data=2,fsdp", "expected comma-separated AXIS=SIZE"),
    ("data=2,model=4", r"unknown axis \['model'\]"),
    ("fsdp=3", "do not fit 8 devices"),
    ({"data": 0}, "sizes must be positive integers or -1"),
])
def test_bad_mesh_specs_are_refused_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A weights folder: Stage C as an official single file (converted through the cache), the other
    components as converted directories; the models they were written from."""
    models = loading.random_components("tiny", seed=3)
    root = tmp_path_factory.mktemp("mesh_weights")
    sets = loading.pipeline_set("tiny")
    for component in ("stage_c", "stage_b", "stage_a", "text_encoder"):
        model_name, config = sets[component]
        arrays = {k: np.asarray(v) for k, v in variables(models[component]).items()}
        checkpoint.save(root / component, {"model": model_name, "config": config, "dtype": "float32"}, arrays)
    export_official(root / "stage_c", root / loading.official_candidates("stage_c", False, "float32")[0])
    shutil.rmtree(root / "stage_c")  # Stage C comes from the single file, through the conversion cache
    shutil.copytree(loading.default_tokenizer_dir(), root / "tokenizer")
    return root, models


def test_loading_with_a_mesh_restores_sharded_arrays_directly(folder, tmp_path, monkeypatch):
    root, models = folder
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path / "cache"))
    targets = []
    real_read = checkpoint._read

    def recording_read(path, target):
        targets.append(target)
        return real_read(path, target)

    monkeypatch.setattr(checkpoint, "_read", recording_read)
    pipe = StableCascadePipeline.from_pretrained(root, dtype="float32", configs="tiny", mesh="fsdp=4,tensor=2")
    # Orbax was handed the sharded layout of every array (nothing restored whole, then split).
    assert len(targets) == 4 and all(t.sharding is not None and len(t.sharding.device_set) == 8
                                      for target in targets for t in target.values())
    c_targets = next(t for t in targets if "clip_txt_mapper.weight" in t)
    assert c_targets["clip_txt_mapper.weight"].sharding.spec == P("fsdp", "tensor")
    for component, loaded in (("stage_c", stage_c_of(pipe)), ("stage_b", stage_b_of(pipe)),
                              ("stage_a", pipe.stage_a)):
        got, want = variables(loaded), variables(models[component])
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=f"{component}.{key}")
    weight = variables(stage_c_of(pipe))["clip_txt_mapper.weight"]  # (32, 64): (8, 32) per device
    assert weight.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in weight.addressable_shards} == {(weight.shape[0] // 4, weight.shape[1] // 2)}

    direct = checkpoint.load_model(root / "stage_b", sharding=make_mesh("fsdp=8"), rules={"in": None, "out": "fsdp"})
    assert variables(direct)["clip_mapper.weight"].sharding.spec == P(None, "fsdp")
    with pytest.raises(TypeError, match="need sharding= a Mesh"):
        checkpoint.load_model(root / "stage_b", rules={"in": None})
