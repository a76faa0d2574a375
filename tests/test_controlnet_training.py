"""ControlNet training on the trainer core: a tiny ControlNet (canny hints) learns, Stage C stays
bit-identical, frozen and in eval mode, only ControlNet parameters train, and the export loads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cascade_jax
import cascade_jax.training.controlnet  # noqa: F401  (registers the c_controlnet task)
from cascade_jax.data import global_batch
from cascade_jax.sharding import make_mesh
from cascade_jax.training import build_run, export_run, get_task, load_config
from cascade_jax.training.controlnet import control_of
from test_controlnet_hints import photo_like

UPDATES = 15


def loader_batch(seed: int) -> dict:
    """Four 64x64 crops of photo-like images (they have edges for the canny hint)."""
    rng = np.random.default_rng(seed)
    images = [photo_like(96, 96, seed=seed * 4 + i) for i in range(4)]
    crops = [im[y:y + 64, x:x + 64] for im, (y, x) in zip(images, rng.integers(0, 32, (4, 2)))]
    return {"images": np.stack(crops), "captions": ["a house", "mountains", "a sunny day", ""], "bucket": (64, 64)}


def stage_c_arrays(run) -> dict:
    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(modules.stage_c, nnx.Variable))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Updates of the trainer's own step on one batch with the step's noise key pinned, so every update
    sees the same noise levels and noise: the loss of that draw must fall (with a random frozen Stage C
    no control can lower the loss averaged over noise much: the prediction is already ~0, loss ~1)."""
    tmp = tmp_path_factory.mktemp("controlnet_run")
    cfg = load_config("controlnet_tiny", [f"checkpoint_path={tmp}/ck", f"output_path={tmp}/out"])
    task = get_task("c_controlnet")
    run = build_run(cfg, task, mesh=make_mesh(devices=jax.devices()[:1]))  # one device: fast to compile
    batch = global_batch(task.host_batch(cfg, loader_batch(0), np.random.default_rng(0)), run.mesh)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(run.state.rng), 0)  # the step's key at step 0
    micro_key = jax.random.fold_in(step_key, 0)  # micro-batch 0 (grad_accum_steps 1)

    @jax.jit
    def loss(params):
        return task.loss(nnx.merge(run.graphdef, params, run.frozen), batch, micro_key, None, cfg)[0]

    before, stage_c_before = float(loss(run.state.params)), stage_c_arrays(run)
    history = []
    for _ in range(UPDATES):
        run.state = run.state.replace(step=jnp.zeros_like(run.state.step))  # pins the key, not the optimizer
        history.append(float(run.step(batch)["loss"]))
    return cfg, task, run, before, float(loss(run.state.params)), stage_c_before, history, tmp


def test_training_lowers_the_loss_and_leaves_stage_c_bit_identical(trained):
    cfg, task, run, before, after, stage_c_before, history, _ = trained
    print(f"controlnet tiny: loss {before:.4f} -> {after:.4f} after {UPDATES} updates (the first at lr 0: "
          f"official warm-up); step losses {[round(h, 4) for h in history]}")
    # The first update runs at lr 0 (warm-up), then every update lowers the (same-draw) loss.
    assert after < 0.97 * before and all(b < a for a, b in zip(history[1:], history[2:]))
    stage_c_after = stage_c_arrays(run)
    assert stage_c_after.keys() == stage_c_before.keys()
    assert all(np.array_equal(stage_c_after[k], stage_c_before[k]) for k in stage_c_before)


def test_only_the_controlnet_trains_and_stage_c_is_in_eval_mode(trained):
    cfg, task, run, *_ = trained
    trained_paths = {path[0] for path, _ in nnx.to_flat_state(run.state.params)}
    assert trained_paths == {"generator"}  # no gradient or optimizer state for Stage C or the encoders
    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
    stage_c, rng = modules.stage_c, np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 2, 16)), jnp.float32)
    args = (x, jnp.full((1,), 0.5), jnp.zeros((1, 3, 32)), jnp.zeros((1, 1, 32)), jnp.zeros((1, 1, 24)))
    # The tiny config gives Stage C dropout 0.1: in eval mode two dropout keys change nothing.
    forward = nnx.jit(lambda model, key: model(*args, rngs=key))
    np.testing.assert_array_equal(forward(stage_c, jax.random.key(1)), forward(stage_c, jax.random.key(2)))


def test_export_is_a_loadable_controlnet(trained):
    _, task, run, *_, tmp = trained
    exported = export_run(run, tmp / "export")
    model = cascade_jax.load_model(exported["generator"][0])
    assert type(model).__name__ == "ControlNet" and model.proj_blocks == (0, 1, 2, 3)
    assert exported["generator"][1].suffix == ".safetensors" and exported["generator"][1].is_file()
    # Named for what it is, beside the frozen Stage C and encoders it trained with (a complete weights folder).
    assert exported["generator"][0].name == "controlnet" and exported["generator"][1].name == "controlnet.safetensors"
    assert {"stage_c", "effnet", "text_encoder", "image_encoder", "tokenizer"} <= {p.name for p in exported["generator"][0].parent.iterdir()}


def test_identity_training_names_what_is_missing():
    cfg = load_config("controlnet_c_3b_identity")
    with pytest.raises(ValueError, match="ArcFace"):
        control_of(cfg)
