"""The trainer core on a toy task: config parsing, the optimizer against hand-computed torch AdamW with
warm-up and clipping, accumulation, EMA, the adaptive buckets threaded through micro-batches,
frozen parts, and one step on 8 simulated devices (FSDP, data x tensor) equal to one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_testing import ToyData, ToyTask, host_params, toy_config, toy_loss

from cascade_jax.data import global_batch
from cascade_jax.diffusion import adaptive_loss_weight_init, adaptive_loss_weight_update
from cascade_jax.sharding import make_mesh
from cascade_jax.training import build_run, config_from_dict, load_config
from cascade_jax.training.loop import host_rng


def run_steps(cfg, n: int, mesh=None, data=None):
    run = build_run(cfg, mesh=mesh or make_mesh(devices=jax.devices()[:1]))
    data = data or ToyData(cfg.batch_size)
    metrics = []
    for step in range(n):
        arrays = run.task.host_batch(cfg, next(data), host_rng(cfg, step))
        metrics.append(jax.device_get(run.step(global_batch(arrays, run.mesh))))
    return run, metrics


def test_unknown_keys_name_the_closest_valid_one(tmp_path):
    with pytest.raises(ValueError, match="'warmup_update'.*did you mean 'warmup_updates'"):
        config_from_dict({"warmup_update": 10})
    with pytest.raises(ValueError, match="'fdsp'.*did you mean 'fsdp'"):
        config_from_dict({"mesh": {"fdsp": 8}})
    cfg = load_config("tiny_c", ["lr=0.5", "mesh.fsdp=2", "multi_aspect_ratio=[1/1, 9/16]"])
    assert cfg.lr == 0.5 and cfg.mesh.fsdp == 2 and cfg.multi_aspect_ratio == ("1/1", "9/16")


@pytest.mark.parametrize("name, batch, size, updates, save_every, adaptive, ratios", [
    ("finetune_c_3b", 512, 768, 100000, 2000, True, 12), ("finetune_c_1b", 1024, 768, 10000, 2000, False, 0),
    ("finetune_c_3b_lowres", 1024, 384, 100000, 2000, True, 12), ("finetune_b_3b", 256, 1024, 100000, 1000, True, 0),
    ("finetune_b_700m", 512, 1024, 10000, 2000, True, 0)])
def test_released_configs_keep_official_values(name, batch, size, updates, save_every, adaptive, ratios):
    cfg = load_config(name)
    assert (cfg.batch_size, cfg.image_size, cfg.updates, cfg.save_every, cfg.adaptive_loss_weight) == (
        batch, size, updates, save_every, adaptive)
    assert (cfg.lr, cfg.weight_decay, cfg.adam_eps, cfg.grad_clip, cfg.warmup_updates) == (1e-4, 0.01, 1e-8, 1.0, 1)
    assert len(cfg.multi_aspect_ratio or ()) == ratios and cfg.backup_every == 20000 and not cfg.use_ema


def torch_adamw_reference(cfg, n: int):
    """Params after n updates: grads by jax.grad of the toy loss, then torch's clip_grad_norm_ and
    AdamW step written out in numpy, lr = lr·min(k / warmup, 1)."""
    modules = ToyTask().build(cfg)
    graphdef, params, frozen = nnx.split(modules, ToyTask().trainable(cfg), ...)
    grad_fn = jax.jit(jax.grad(lambda p, b: toy_loss(nnx.merge(graphdef, p, frozen), b, None)[0]))
    p = {k: np.asarray(v, np.float64) for k, v in host_params(params).items()}
    m, v = ({k: np.zeros_like(x) for k, x in p.items()} for _ in range(2))
    data, coefs = ToyData(cfg.batch_size), []
    for k in range(n):
        current = jax.tree_util.tree_unflatten(jax.tree.structure(params), [jnp.asarray(p[key], jnp.float32)
                                                                            for key in host_params(params)])
        g = {key: np.asarray(x, np.float64) for key, x in host_params(grad_fn(current, next(data))).items()}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        coef = min(1.0, cfg.grad_clip / (norm + 1e-6))
        coefs.append(coef)
        lr = cfg.lr * min(k / cfg.warmup_updates, 1.0)
        for key in p:
            gk = g[key] * coef
            p[key] *= 1 - lr * cfg.weight_decay
            m[key] = 0.9 * m[key] + 0.1 * gk
            v[key] = 0.999 * v[key] + 0.001 * gk ** 2
            m_hat, v_hat = m[key] / (1 - 0.9 ** (k + 1)), v[key] / (1 - 0.999 ** (k + 1))
            p[key] -= lr * m_hat / (np.sqrt(v_hat) + cfg.adam_eps)
    return p, coefs


def test_optimizer_matches_torch_adamw_with_warmup_and_clipping(tmp_path):
    cfg = toy_config(tmp_path, grad_clip=0.5)
    run, metrics = run_steps(cfg, 4)
    expected, coefs = torch_adamw_reference(cfg, 4)
    assert [round(float(m["lr"]), 6) for m in metrics] == [0.0, 0.025, 0.05, 0.05]
    assert min(coefs) < 1.0  # clipping was active
    ours = host_params(run.state.params)
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, rtol=2e-5, atol=1e-6, err_msg=key)


def test_accumulation_equals_one_big_batch_and_frozen_parts_stay(tmp_path):
    one, _ = run_steps(toy_config(tmp_path, batch_size=8), 3)
    four, _ = run_steps(toy_config(tmp_path, batch_size=8, grad_accum_steps=4), 3)
    for key, value in host_params(one.state.params).items():
        np.testing.assert_allclose(host_params(four.state.params)[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    # Frozen: not in the train state, no optimizer moments, values untouched.
    n_trainable = len(jax.tree.leaves(four.state.params))
    assert n_trainable == 3 and len(jax.tree.leaves(four.state.opt_state)) == 2 * n_trainable + 2  # + two step counts
    initial = nnx.split(ToyTask().build(four.cfg), ToyTask().trainable(four.cfg), ...)[2]
    for key, value in host_params(initial).items():
        np.testing.assert_array_equal(host_params(four.frozen)[key], value)


def test_ema_follows_the_official_micro_iteration_rule(tmp_path):
    cfg = toy_config(tmp_path, grad_accum_steps=2, ema_start_iters=3, ema_iters=2, ema_beta=0.9)
    run = build_run(cfg, mesh=make_mesh(devices=jax.devices()[:1]))
    data, params = ToyData(cfg.batch_size), [host_params(run.state.params)]
    ema = dict(params[0])
    for step in range(4):
        run.step(global_batch(run.task.host_batch(cfg, next(data), None), run.mesh))
        params.append(host_params(run.state.params))
        for j in range(2):  # micro-iterations i = 2·step + j + 1; the update lands at the last one
            i = 2 * step + j + 1
            current = params[-1] if j == 1 else params[-2]
            if i % 2 == 0:
                beta = 0.9 if i > 3 else 0.0
                ema = {k: ema[k] * beta + current[k] * (1 - beta) for k in ema}
    for key, value in host_params(run.state.ema).items():
        np.testing.assert_allclose(value, ema[key], rtol=1e-6, atol=1e-8, err_msg=key)


def test_adaptive_buckets_update_after_every_micro_batch(tmp_path):
    cfg = toy_config(tmp_path, grad_accum_steps=2, adaptive_loss_weight=True)
    run = build_run(cfg, mesh=make_mesh(devices=jax.devices()[:1]))
    graphdef = run.graphdef
    params0, frozen = jax.device_get(run.state.params), jax.device_get(run.frozen)
    batch = ToyData(cfg.batch_size).rows(0, cfg.batch_size)
    run.step(global_batch(run.task.host_batch(cfg, batch, None), run.mesh))
    # By hand: micro-batch i takes rows i, i+2, ...; each updates the buckets with its unweighted losses.
    state = adaptive_loss_weight_init()
    modules = nnx.merge(graphdef, params0, frozen)
    for i in range(2):
        micro = {k: jnp.asarray(v[i::2]) for k, v in batch.items() if k != "index"}
        _, aux = toy_loss(modules, micro, state)
        state = adaptive_loss_weight_update(state, aux.logsnr, aux.per_sample_loss)
    assert np.sum(np.asarray(state.bucket_losses) != 1.0) == 8  # every sample in its own bucket
    np.testing.assert_allclose(np.asarray(run.state.loss_state.bucket_losses), np.asarray(state.bucket_losses),
                               rtol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("mesh_shape, expected_spec", [((1, 8, 1), ("fsdp", None)), ((2, 1, 4), (None, "tensor"))])
def test_sharded_step_equals_single_device(tmp_path, mesh_shape, expected_spec):
    cfg = toy_config(tmp_path, batch_size=16, grad_accum_steps=2, adaptive_loss_weight=True,
                     ema_start_iters=0, ema_iters=1, ema_beta=0.9)
    single, m1 = run_steps(cfg, 2)
    sharded, m8 = run_steps(cfg, 2, mesh=make_mesh(*mesh_shape))
    w1 = sharded.state.params["generator"]["w1"]
    assert tuple(w1[...].sharding.spec) == expected_spec
    mu = sharded.state.opt_state[1][0].mu["generator"]["w1"]
    assert tuple(mu[...].sharding.spec) == expected_spec  # moments laid out like their parameter
    for tree in ("params", "ema", "opt_state", "loss_state"):
        a, b = host_params(getattr(single.state, tree)), host_params(getattr(sharded.state, tree))
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=f"{tree} {key}")
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=1e-5)


def test_official_init_from_scratch():
    from cascade_jax.models.random_init import random_model
    from cascade_jax.nn.params import named_variables
    from cascade_jax.training.init import official_init

    config = dict(load_config("tiny_c").model_config)
    model = official_init(random_model("stage_c", config, seed=1), "stage_c", config, seed=0)
    values = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    assert not values["clf.1.weight"].any() and not values["down_blocks.0.1.mapper.weight"].any()
    assert not values["down_blocks.0.0.channelwise.2.gamma"].any()  # GRN starts at zero, as torch
    assert abs(values["clip_txt_mapper.weight"].std() - 0.02) < 0.002
    w = values["down_blocks.0.2.kv_mapper.1.weight"]  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert np.abs(w).max() <= np.sqrt(6 / sum(w.shape)) and np.abs(w).max() > 0.9 * np.sqrt(6 / sum(w.shape))
    assert not values["down_blocks.0.2.kv_mapper.1.bias"].any()
