"""LoRA training on the trainer core: a tiny LoRA with a new token lowers the loss, only LoRA
factors and token deltas train, every base parameter stays bit-identical, and the LoRA file
written at a save loads back and changes what the new token's prompt gives."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import cascade_jax.training.lora  # noqa: F401  (registers the c_lora task)
from cascade_jax.data import global_batch
from cascade_jax.models.lora import LoRAParam, set_enabled
from cascade_jax.sharding import make_mesh
from cascade_jax.training import build_run, get_task, load_config
from cascade_jax.weights.lora_files import file_info, load_lora, read_tensors

UPDATES = 40


def loader_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = (rng.random((4, 64, 64, 3)) * 255).astype(np.uint8)
    return {"images": images, "captions": ["a photo of [fernando]", "[fernando] on grass", "a dog", ""],
            "bucket": (64, 64)}


def base_arrays(run) -> dict:
    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(modules, nnx.Param))
            if not isinstance(v, LoRAParam)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    cfg = load_config("tiny_c_lora", [f"checkpoint_path={tmp}/ck", f"output_path={tmp}/out"])
    task = get_task("c_lora")
    try:
        run = build_run(cfg, task, mesh=make_mesh(devices=jax.devices()[:1]))
    except FileNotFoundError as e:  # no CLIP BPE file for the tokenizer
        pytest.skip(str(e))
    batch = global_batch(task.host_batch(cfg, loader_batch(0), np.random.default_rng(0)), run.mesh)
    keys = jax.random.split(jax.random.key(100), 4)  # fixed noise levels and noise for the evaluations

    @jax.jit
    def mean_loss(params, frozen):
        modules = nnx.merge(run.graphdef, params, frozen)
        return jax.lax.map(lambda k: task.loss(modules, batch, k, None, cfg)[0], keys).mean()  # one body to compile

    loss = lambda: float(mean_loss(run.state.params, run.frozen))
    before, base_before = loss(), base_arrays(run)
    history = [float(run.step(batch)["loss"]) for _ in range(UPDATES)]
    return cfg, task, run, before, loss(), base_before, history


def test_lora_training_lowers_the_loss_and_leaves_the_base_bit_identical(trained):
    cfg, task, run, before, after, base_before, history = trained
    print(f"LoRA tiny: fixed-noise loss {before:.4f} -> {after:.4f} after {UPDATES} updates")
    assert after < 0.85 * before
    base_after = base_arrays(run)
    assert base_after.keys() == base_before.keys()
    assert all(np.array_equal(base_after[k], base_before[k]) for k in base_before)


def test_only_lora_factors_and_token_rows_train(trained):
    _, task, run, *_ = trained
    params = nnx.to_flat_state(run.state.params)
    assert all(isinstance(v, LoRAParam) for _, v in params)
    tops = {path[0] for path, _ in params}
    assert tops == {"generator", "text_encoder"}
    # tiny: 4 attention blocks x (out_proj, in_proj) x (lora_down, lora_up)
    assert len([p for p, _ in params if p[0] == "generator"]) == 4 * 2 * 2
    new_id = task.tokenizer.token_to_id("[fernando]")
    assert list(task.tokens.indices) == [new_id]
    rows = next(v[...] for p, v in params if p[0] == "text_encoder")
    assert np.any(np.asarray(rows) != 0)  # the new token's delta trained
    # ... and changes what a prompt with the token encodes to (against the delta switched off).
    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
    ids = np.asarray(task.tokenizer(["a photo of [fernando]"])["input_ids"])
    trained_pooled = np.asarray(modules.text_encoder(ids).text_embeds)
    set_enabled(modules.text_encoder, "lora", False)
    assert not np.allclose(np.asarray(modules.text_encoder(ids).text_embeds), trained_pooled, atol=1e-5)


def test_lora_file_written_at_save_loads_back(trained, tmp_path):
    cfg, task, run, *_ = trained
    path = task.write_lora(cfg, run.state.params, UPDATES)
    info = file_info(read_tensors(path)[1])
    assert info["tokens"] == ["[fernando]"] and info["train_tokens"] == [["[fernando]", "^dog</w>"]]
    modules = nnx.merge(run.graphdef, run.state.params, run.frozen)
    lora = load_lora(path, modules.generator)
    assert set(lora.layers) == set(task.alphas) and lora.tokens.tokens == ["[fernando]"]


def test_a_scan_blocks_run_writes_its_lora_per_block(trained, tmp_path):
    """With scan_blocks the generator's units are stacked: the writer is given the run's stack_layouts (the task
    keeps none) and writes the same per-block keys and shapes as the unstacked run's file."""
    cfg, task, run, *_ = trained
    scan_cfg = load_config("tiny_c_lora", [f"checkpoint_path={tmp_path}/ck", f"output_path={tmp_path}/out",
                                           "scan_blocks=true"])
    scan_task = get_task("c_lora")
    scanned = build_run(scan_cfg, scan_task, mesh=run.mesh)
    assert scanned.stack_layouts.get("generator")
    with pytest.raises(ValueError, match="pass its stack_layouts"):
        scan_task.write_lora(scan_cfg, scanned.state.params, 0)
    written = read_tensors(scan_task.write_lora(scan_cfg, scanned.state.params, 0, scanned.stack_layouts))[0]
    reference = read_tensors(task.write_lora(cfg, run.state.params, UPDATES))[0]
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in reference.items()}
