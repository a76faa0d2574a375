"""Latent consistency distillation (stages c_lcm and b_lcm): the solver and the loss against hand-computed values, the
tasks on the trainer (the teacher gets no gradient and stays bit-identical, a tiny distillation lowers the loss),
the LCM-LoRA file in the pipeline (loads as --lora does, stacks with another LoRA), the same distillation and file
with scan_blocks (stacked units), and the config's refusals."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cascade_jax.training.lcm  # noqa: F401  (registers the c_lcm task)
import cascade_jax.training.lcm_b  # noqa: F401  (registers the b_lcm task)
from cascade_jax.data import global_batch
from cascade_jax.diffusion import GDF
from cascade_jax.diffusion.consistency import boundary_scalings, consistency_function, consistency_loss, \
    solver_times, teacher_ddim_step
from cascade_jax.models import lora as L
from cascade_jax.pipelines.loading import pipeline_set
from cascade_jax.sharding import make_mesh
from cascade_jax.training import build_run, get_task, load_config
from cascade_jax.training.lcm import task_params
from cascade_jax.training.lcm_config import lcm_config
from cascade_jax.weights.lora_files import save_official
from cascade_jax.weights.lora_weights import LoRAWeights

UPDATES = 12
SCANNED_UPDATES = 3  # the scan_blocks run's length (its compile is most of its cost), compared at this update


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_the_solver_grid_boundary_and_loss_match_hand_computed_values():
    t, t_prev = solver_times(jnp.array([1, 3, 10]), 10, skip=2)
    np.testing.assert_allclose(t, [0.1, 0.3, 1.0], rtol=1e-7)
    np.testing.assert_allclose(t_prev, [0.0, 0.1, 0.8], rtol=1e-7)  # clamped at 0 as the reference clamps
    c_skip, c_out = boundary_scalings(jnp.array([0.0, 0.1]))
    # the reference's timestep 100 scaled by 10 = 1000; sigma_data 0.5
    np.testing.assert_allclose(c_skip, [1.0, 0.25 / (1000.0**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(c_out, [0.0, 1000.0 / math.sqrt(1000.0**2 + 0.25)], rtol=1e-6)
    x, x0 = jnp.full((2, 1, 1, 1), 3.0), jnp.full((2, 1, 1, 1), -1.0)
    f = consistency_function(x, x0, jnp.array([0.0, 0.1]))
    assert float(f[0, 0, 0, 0]) == 3.0  # the boundary: f(x, 0) = x exactly
    np.testing.assert_allclose(f[1, 0, 0, 0], 3.0 * c_skip[1] - c_out[1], rtol=1e-6)

    d = jnp.array([[0.003, -0.004], [1.0, 0.0]])
    huber = [(math.sqrt(0.003**2 + 1e-6) - 1e-3 + math.sqrt(0.004**2 + 1e-6) - 1e-3) / 2,
             (math.sqrt(1 + 1e-6) - 1e-3 + 0.0) / 2]
    np.testing.assert_allclose(consistency_loss(d, jnp.zeros_like(d), "huber", 0.001), huber, rtol=1e-5)
    np.testing.assert_allclose(consistency_loss(d, jnp.zeros_like(d), "l2"), [(9e-6 + 16e-6) / 2, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="huber"):
        consistency_loss(d, d, "l1")


def test_the_teacher_ddim_step_follows_the_exact_ode_of_a_one_point_dataset():
    """Data = the single point mu: the exact eps-prediction is (x - a mu) / b, and the DDIM step from logSNR l to l'
    lands on the exact probability-flow trajectory a' mu + b' (x - a mu) / b (hand-computed here in float64)."""
    gdf, mu, x = GDF(), np.array([0.7, -1.2]), np.array([0.3, 2.0])
    logsnr, logsnr_prev = float(gdf.logsnr(0.6)), float(gdf.logsnr(0.4))
    a, b = math.sqrt(sigmoid(logsnr)), math.sqrt(1 - sigmoid(logsnr))
    a2, b2 = math.sqrt(sigmoid(logsnr_prev)), math.sqrt(1 - sigmoid(logsnr_prev))
    eps = (x - a * mu) / b
    arrays = [jnp.asarray(v.reshape(1, 2), jnp.float32) for v in (x, mu, eps)]
    step = teacher_ddim_step(*arrays, jnp.array([logsnr]), jnp.array([logsnr_prev]))
    np.testing.assert_allclose(step[0], a2 * mu + b2 * eps, rtol=1e-5)


def test_lcm_config_refusals():
    assert lcm_config({"guidance": 3}).guidance == (3,)
    for values, message in (({"studnet": "lora"}, "did you mean 'student'"), ({"student": "half"}, "lcm.student"),
                            ({"guidance": [6, 2]}, "lcm.guidance"), ({"loss": "l1"}, "lcm.loss"),
                            ({"skip": 60}, "lcm.skip")):
        with pytest.raises(ValueError, match=message):
            lcm_config(values)
    with pytest.raises(ValueError, match="dropout: false"):
        get_task("c_lcm").build(tiny_config("lora", dropout=True))


def tiny_config(student: str, tmp="/tmp/cascade_jax_lcm_test", **changes):
    """tiny_c as a c_lcm run whose Stage C is the tiny pipeline's (so its LoRA fits StableCascadePipeline.random)."""
    cfg = load_config("tiny_c", [f"checkpoint_path={tmp}/ck", f"output_path={tmp}/out"])
    # lr: with the tiny encoders seeded by their place in the set (the same in every task), 1e-2 made the LoRA
    # diverge (1.5x the loss after 12 updates); 2e-3 gave 0.92 / 0.85 / 0.89 / 0.75x after 3 / 6 / 9 / 12.
    values = dict(stage="c_lcm", model_config=pipeline_set("tiny")["stage_c"][1], dropout=False, lr=2e-3,
                  lcm={"student": student, "solver_steps": 4, "guidance": [2.0, 4.0], "loss": "l2"},
                  lora=dataclasses.replace(cfg.lora, module_filters=(".attn", "channelwise"), rank=4),
                  ema_start_iters=0, ema_iters=1, ema_beta=0.5, save_every=1000)
    return dataclasses.replace(cfg, **{**values, **changes})


def loader_batch() -> dict:
    rng = np.random.default_rng(0)
    return {"images": (rng.random((4, 64, 64, 3)) * 255).astype(np.uint8),
            "captions": ["a red circle", "a blue square", "a dog", ""], "bucket": (64, 64)}


def eval_loss_fn(run):
    """The consistency loss at fixed keys against the current target (EMA), without updating anything."""
    @jax.jit
    def loss(params, ema, frozen, batch, keys):
        modules, target = nnx.merge(run.graphdef, params, frozen), nnx.merge(run.graphdef, ema, frozen)
        return jnp.mean(jax.lax.map(lambda k: run.task.loss(modules, batch, k, None, run.cfg, target=target)[0], keys))

    return lambda batch, keys: float(loss(run.state.params, run.state.ema, run.frozen, batch, keys))


def params_of(run, exclude=L.LoRAParam) -> dict:
    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(modules, nnx.Param))
            if not isinstance(v, exclude)}


def tiny_b_config(tmp="/tmp/cascade_jax_lcm_b_test"):
    """tiny_b (random weights, tiny encoders) as a b_lcm LCM-LoRA run with a guidance range, as tiny_config."""
    cfg = load_config("tiny_b", [f"checkpoint_path={tmp}/ck", f"output_path={tmp}/out"])
    values = dict(stage="b_lcm", dropout=False, lr=2e-3,
                  lcm={"student": "lora", "solver_steps": 4, "guidance": [1.0, 2.0], "loss": "l2"},
                  lora=dataclasses.replace(cfg.lora, module_filters=(".attn", "channelwise", "mapper"), rank=4),
                  ema_start_iters=0, ema_iters=1, ema_beta=0.5, save_every=1000)
    return dataclasses.replace(cfg, **values)


class Distilled(NamedTuple):
    run: object
    task: object
    before: float  # the loss at fixed keys before the updates (eval_loss_fn)
    after: float  # ... and after them
    base: dict  # the frozen weights before
    losses: list  # each update's loss, as the step reports it
    ema_at_scanned: object  # a host copy of the EMA (the target, what the LoRA file holds) after SCANNED_UPDATES


def distil_tiny(cfg, mesh) -> Distilled:
    """UPDATES updates on one batch."""
    task = get_task(cfg.stage)
    run = build_run(cfg, task, mesh=mesh)
    batch = global_batch(task.host_batch(cfg, loader_batch(), np.random.default_rng(0)), run.mesh)
    keys, eval_loss = jax.random.split(jax.random.key(1), 4), eval_loss_fn(run)
    before, base, losses, ema_at_scanned = eval_loss(batch, keys), params_of(run), [], None
    for update in range(1, UPDATES + 1):
        losses.append(float(run.step(batch)["loss"]))
        if update == SCANNED_UPDATES:
            ema_at_scanned = jax.device_get(run.state.ema)
    return Distilled(run, task, before, eval_loss(batch, keys), base, losses, ema_at_scanned)


@pytest.fixture(scope="module")
def lora_run():
    return distil_tiny(tiny_config("lora"), make_mesh(devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def scanned_lora_run():
    """lora_run's distillation with scan_blocks (as the 3.6B configs run: each level's repeated units stacked, their
    LoRA factors and EMA too, one scan per run of units), for SCANNED_UPDATES updates: (run, task, losses)."""
    cfg = dataclasses.replace(tiny_config("lora"), scan_blocks=True)
    task = get_task(cfg.stage)
    run = build_run(cfg, task, mesh=make_mesh(devices=jax.devices()[:1]))
    batch = global_batch(task.host_batch(cfg, loader_batch(), np.random.default_rng(0)), run.mesh)
    return run, task, [float(run.step(batch)["loss"]) for _ in range(SCANNED_UPDATES)]


@pytest.fixture(scope="module")
def b_lora_run():
    # sharded: parameters, LoRA, EMA target and batch over 2 devices (FSDP), as on a pod
    return distil_tiny(tiny_b_config(), make_mesh(1, 2, 1, devices=jax.devices()[:2]))


def test_a_tiny_lcm_lora_distillation_lowers_the_loss_and_leaves_the_teacher_bit_identical(lora_run):
    check_distillation(lora_run)


def test_a_tiny_stage_b_lcm_lora_distillation_lowers_the_loss_and_leaves_the_teacher_bit_identical(b_lora_run,
                                                                                                    tmp_path):
    from cascade_jax.weights.lora_files import load_lora, model_config_of

    run, task = b_lora_run.run, b_lora_run.task
    check_distillation(b_lora_run)
    assert {p[0] for p, _ in nnx.to_flat_state(run.frozen)} >= {"stage_a", "effnet", "text_encoder"}
    path = task.write_lora(dataclasses.replace(run.cfg, output_path=str(tmp_path)), task_params(run.state), UPDATES)
    assert model_config_of(path)["model"] == "stage_b"  # what convert/lora.py merge and a weight set check
    student = nnx.merge(run.graphdef, run.state.params, run.frozen).generator
    assert load_lora(path, student).layers.keys() == L.lora_layers(student, "lora").keys()


def check_distillation(distilled: Distilled):
    before, after, base = distilled.before, distilled.after, distilled.base
    assert after < 0.9 * before, (before, after)  # measured 0.75x (c_lcm) on 4 fixed draws
    now = params_of(distilled.run)
    assert now.keys() == base.keys() and all(np.array_equal(now[k], base[k]) for k in base)
    trained = nnx.to_flat_state(distilled.run.state.params)
    assert trained and all(isinstance(v, L.LoRAParam) for _, v in trained)  # only the LoRA has optimizer state


def test_scan_blocks_distils_the_same_lcm_lora_and_writes_it_per_block(lora_run, scanned_lora_run, tmp_path):
    """With scan_blocks the stacked student (LoRA factors stacked over the units), its LoRA-off teacher and EMA
    target give the unrolled run's losses, and the file written from the stacked EMA is the unrolled run's (keys
    in official per-block order, metadata, values) and merges into Stage C as --lora does."""
    from cascade_jax.models.random_init import random_model
    from cascade_jax.pipelines.loading import with_loras
    from cascade_jax.weights.lora_files import read_tensors

    run, task, losses = scanned_lora_run
    assert any(entry[0] == "stack" for entries in run.stack_layouts["generator"].values() for entry in entries)
    # float32 reassociation in the scanned forward: measured 1e-7 relative
    np.testing.assert_allclose(losses, lora_run.losses[:SCANNED_UPDATES], rtol=1e-5)
    files = [lora_run.task.write_lora(dataclasses.replace(lora_run.run.cfg, output_path=str(tmp_path / "unrolled")),
                                      lora_run.ema_at_scanned, SCANNED_UPDATES),
             task.write_lora(dataclasses.replace(run.cfg, output_path=str(tmp_path / "scanned")), task_params(run.state),
                             SCANNED_UPDATES, run.stack_layouts)]
    (reference, reference_info), (written, written_info) = (read_tensors(f) for f in files)
    assert list(written) == list(reference) and written_info == reference_info
    # Through AdamW, where a gradient is ~0 its reassociation noise moves an update by a share of lr; measured
    # 1e-6 absolute on factors of size up to 4.
    for key, value in reference.items():
        np.testing.assert_allclose(written[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    stage_c = random_model(*pipeline_set("tiny")["stage_c"], seed=0)
    base, merged_reference, merged_written = (
        {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        for model in (stage_c, with_loras(stage_c, [files[0]]), with_loras(stage_c, [files[1]])))
    assert merged_written.keys() == base.keys()
    assert any(not np.array_equal(merged_written[k], base[k]) for k in base)
    for key, value in merged_reference.items():
        np.testing.assert_allclose(merged_written[key], value, rtol=1e-4, atol=1e-5, err_msg=str(key))


def test_the_full_students_teacher_gets_no_gradient():
    cfg = tiny_config("full", model_config=load_config("tiny_c").model_config)  # tiny_c's one-level Stage C: cheaper
    task = get_task("c_lcm")
    modules = task.build(cfg)
    batch = global_batch(task.host_batch(cfg, loader_batch(), np.random.default_rng(0)),
                         make_mesh(devices=jax.devices()[:1]))
    graphdef, teacher, rest = nnx.split(modules, lambda path, v: path[0] == "teacher" and isinstance(v, nnx.Param), ...)

    def loss(teacher_params):
        merged = nnx.merge(graphdef, teacher_params, rest)
        return task.loss(merged, batch, jax.random.key(0), None, cfg, target=merged)[0]

    grads = jax.grad(loss)(teacher)
    assert all(not np.any(np.asarray(g[...])) for _, g in nnx.to_flat_state(grads))
    names = {p[0] for p, _ in nnx.to_flat_state(nnx.state(modules, task.trainable(cfg)))}
    assert names == {"generator"}  # the student trains; the teacher is frozen (no optimizer state)


def test_the_lcm_lora_file_loads_as_lora_does_and_stacks_with_another(lora_run, tmp_path):
    from cascade_jax.pipelines import StableCascadePipeline

    run, task, *_ = lora_run
    lcm_file = task.write_lora(dataclasses.replace(run.cfg, output_path=str(tmp_path)), run.state.ema, UPDATES)
    pipe = StableCascadePipeline.random("tiny")
    other = L.shallow_copy(nnx.merge(pipe.prior.graphdef, pipe.prior.state))
    L.init_lora(other, "other", rank=2, key=jax.random.key(3))
    for _, weight in L.adapted_weights(other):
        down = weight.adapters["other"].lora_down
        down.set_value(np.random.default_rng(1).normal(size=down.shape).astype(np.float32) * 0.05)
    other_file = tmp_path / "other.safetensors"
    save_official(other_file, LoRAWeights(L.lora_layers(other, "other")))

    def stage_c(loras):
        pipe.load_loras(loras)  # what generate.py's --lora calls
        model = nnx.merge(pipe.prior.graphdef, pipe.prior.state)
        return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    base, lcm, oth, both = stage_c([]), stage_c([str(lcm_file)]), stage_c([str(other_file)]), \
        stage_c([str(lcm_file), f"{other_file}:1.0"])
    changed = [k for k in base if not np.array_equal(base[k], lcm[k])]
    assert changed and any(not np.array_equal(base[k], oth[k]) for k in base)
    for k in base:
        np.testing.assert_allclose(both[k] - base[k], (lcm[k] - base[k]) + (oth[k] - base[k]), atol=1e-6)


def test_generate_selects_the_lcm_sampler_and_no_guidance_from_flags():
    import importlib.util
    import types

    from helpers import REPO

    from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "sample" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = script.parse_args(["text2img", "--random", "tiny", "--sampler", "lcm", "--prior-steps", "4",
                             "--prior-cfg", "none"])
    prior, _ = run.checked.settings(types.SimpleNamespace(prior_defaults=PRIOR_DEFAULTS,
                                                          decoder_defaults=DECODER_DEFAULTS))
    assert (prior.sampler, prior.steps, prior.cfg) == ("lcm", 4, None)
    with pytest.raises(SystemExit):
        script.parse_args(["text2img", "--random", "tiny", "--prior-cfg", "strong"])


# demo-lcm (the shipped demo with its LCM-LoRA and sampling.json: LCM sampler, 4 Stage C + 2 Stage B steps, no
# guidance) on a fixed set of seen and held-out prompts, two seeds each, as tests/test_demo.py checks the demo.
# The bounds are the demo's own (tests/test_demo.py), under what this set measured (seen colour 0.92, shape 0.88,
# position 1.0, background 0.88; held-out 0.96, 0.88, 0.96, 1.0; 24 images a split, one image = 0.04) and far above
# chance (colour and background 0.125, shape 0.33, position 0.2) and above the undistilled demo in the same 4+2
# steps (held-out colour 0.26, shape 0.40, position 0.40, background 0.56 in benchmarks/results/demo_lcm.md).
LCM_PROMPTS_PER_SPLIT = 12
LCM_LOWER_BOUNDS = {"colour": 0.7, "shape": 0.65, "background": 0.75, "position": 0.6}
LCM_SCRIPT = """
import json, sys
from cascade_jax.demo import shapes
from cascade_jax.pipelines import StableCascadePipeline
splits = {split: [shapes.Combo(*c) for c in combos] for split, combos in json.loads(sys.argv[1]).items()}
truth = [c for combos in splits.values() for c in combos for _ in range(2)]
pipe = StableCascadePipeline.from_pretrained("demo-lcm", dtype="float32")
images = pipe.text_to_image([shapes.caption(c) for c in truth], height=128, width=128,
                            seed=list(range(len(truth)))).images
p, d = pipe.prior_defaults, pipe.decoder_defaults
result, start = {"prior": [p.sampler, p.steps, p.cfg], "decoder": [d.sampler, d.steps, d.cfg]}, 0
for split, combos in splits.items():
    n = 2 * len(combos)
    result[split] = shapes.accuracy(images[start:start + n], truth[start:start + n])
    start += n
print(json.dumps(result))
"""


def test_demo_lcm_draws_what_the_prompt_says_in_few_steps():
    import json
    import subprocess
    import sys

    from helpers import REPO

    from cascade_jax import demo
    from cascade_jax.demo import shapes
    from cascade_jax.demo.lcm_recipe import SAMPLING

    assert (demo.LCM_DIR / demo.LCM_LORA_FILE).is_file(), f"demo-lcm is missing from {demo.LCM_DIR}"
    chosen = {}
    for split in shapes.SPLITS:
        combos = shapes.combos_of(split)
        chosen[split] = [list(c) for c in combos[:: len(combos) // LCM_PROMPTS_PER_SPLIT][:LCM_PROMPTS_PER_SPLIT]]
    out = subprocess.run([sys.executable, "-c", LCM_SCRIPT, json.dumps(chosen)], capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prior"] == ["lcm", SAMPLING["prior"]["steps"], None]  # its sampling.json
    assert result["decoder"] == [SAMPLING["decoder"].get("sampler", "ddpm"), SAMPLING["decoder"]["steps"],
                                 SAMPLING["decoder"]["cfg"]]
    for split in shapes.SPLITS:
        for attribute, bound in LCM_LOWER_BOUNDS.items():
            assert result[split][attribute] >= bound, (split, attribute, result)
