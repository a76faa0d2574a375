"""LoRA on Stage C: the official fixture (output and token rows), file write-back, strength,
merging, stacking, ComfyUI round trip, model-size mismatch and the official module order."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import REPO, fixture, load_fixture_model, nchw_to_nhwc, nhwc_to_nchw, read_checkpoint_layout, \
    relative_error

from cascade_jax.models import lora as L
from cascade_jax.models.lora_tokens import attach_token_rows
from cascade_jax.models.registry import abstract_model, load_config
from cascade_jax.nn.layers import Embedding
from cascade_jax.weights.lora_files import file_info, load_lora, read_tensors, save_comfyui, save_official

PARITY = 1e-4  # max|Δ| / max|ref| against the official float32 outputs
FP32_ROUNDING = 1e-6


@nnx.jit
def run(model, inputs: dict):
    return model(inputs["x"], inputs["r"], inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"],
                 sca=inputs["sca"], crp=inputs["crp"])


@pytest.fixture(scope="module")
def official(fixtures_dir, tmp_path_factory):
    """(model, NHWC inputs, stage_c io, lora io, lora file path, converted dir) of the official fixtures."""
    config, io, weights = fixture(fixtures_dir, "stage_c")
    tmp = tmp_path_factory.mktemp("stage_c")
    model = load_fixture_model("stage_c", config["config"], weights, tmp)
    inputs = {k: jnp.asarray(nchw_to_nhwc(io[k])) for k in
              ("x", "r", "clip_text", "clip_text_pooled", "clip_img", "sca", "crp")}
    lora_io = dict(np.load(fixtures_dir / "lora" / "io.npz"))
    return model, inputs, io, lora_io, fixtures_dir / "lora" / "lora.safetensors", tmp / "stage_c_converted"


def _params(model) -> dict:
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_fixture_output_and_bit_exact_removal(official):
    model, inputs, io, lora_io, path, _ = official
    before = _params(model)
    L.attach_lora(model, "fixture", load_lora(path, model))
    unmerged = nhwc_to_nchw(run(model, inputs))
    merged = nhwc_to_nchw(run(L.merged_model(model), inputs))  # the plain structure: the base's compiled program
    err, err_merged = (relative_error(out, lora_io["out_with_lora"]) for out in (unmerged, merged))
    merged_vs_unmerged = relative_error(merged, unmerged)
    print(f"LoRA fixture: run time {err:.2e}, merged {err_merged:.2e}, merged vs unmerged {merged_vs_unmerged:.2e} "
          f"(bound {PARITY:.0e})")
    assert max(err, err_merged) <= PARITY and merged_vs_unmerged <= FP32_ROUNDING
    L.merge(model)  # in place: each adapted weight read once, then served from the cache
    assert all(np.array_equal(w.merged[...], w.compute()) for _, w in L.adapted_weights(model))
    L.unmerge(model)
    L.remove_lora(model)
    after = _params(model)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert relative_error(nhwc_to_nchw(run(model, inputs)), io["out"]) <= PARITY


def test_fixture_token_rows(official):
    *_, lora_io, path, _ = official
    lora = load_lora(path, official[0])
    table = Embedding(*lora_io["token_table"].shape, rngs=nnx.Rngs(0))
    table.weight.set_value(jnp.asarray(lora_io["token_table"]))
    attach_token_rows(table, "fixture", lora.tokens)
    err = relative_error(table.weight[...], lora_io["token_table_retoken"])
    print(f"token rows: {err:.2e}")
    assert err <= PARITY
    assert np.array_equal(np.asarray(table(jnp.asarray([0, 1]))), lora_io["token_table"][[0, 1]])


def test_write_back_identical_tensors(official, tmp_path):
    model, *_, path, _ = official
    lora = load_lora(path, model)
    out = tmp_path / "lora.safetensors"
    save_official(out, lora)
    ours, metadata = read_tensors(out)
    theirs, _ = read_tensors(path)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and np.array_equal(ours[key], theirs[key]), key
    info = file_info(metadata)
    assert info["modules"] == list(lora.layers) and info["rank"] == 4 and info["module_filters"] == [".attn"]


def _random_lora(model, seed, rank) -> L.LoRAWeights:
    rng = np.random.default_rng(seed)
    layers = {}
    for target in L.lora_targets(model):
        d0, d1 = target.torch_dims()
        layers[target.key] = L.LayerFactors(rng.normal(size=(rank, d1)).astype(np.float32) * 0.05,
                                            rng.normal(size=(d0, rank)).astype(np.float32))
    return L.LoRAWeights(layers)


def test_strength_zero_and_two_loras_sum(official):
    model, inputs, *_ = official
    # Forward passes go through merged copies: they have the base structure, so one compiled program serves all.
    forward = lambda: np.asarray(run(L.merged_model(model), inputs))
    base = forward()
    a, b = 0.7, -0.4
    first, second = _random_lora(model, 1, 4), _random_lora(model, 2, 3)
    L.attach_lora(model, "first", first, 0.0)
    assert np.array_equal(forward(), base)
    L.attach_lora(model, "second", second, b)
    L.set_strength(model, "first", a)
    stacked = forward()
    L.remove_lora(model)
    # One rank-7 LoRA whose delta is a·Δ1 + b·Δ2: lora_down stacked, lora_up side by side and rescaled.
    combined = {}
    for key in first.layers:
        f, s = first.layers[key], second.layers[key]
        up = np.concatenate([f.up * (a * 7 / 4), s.up * (b * 7 / 3)], axis=1)
        combined[key] = L.LayerFactors(np.concatenate([f.down, s.down]), up.astype(np.float32))
    L.attach_lora(model, "sum", L.LoRAWeights(combined))
    summed = forward()
    L.set_enabled(model, "sum", False)
    disabled = forward()
    L.remove_lora(model)
    err = relative_error(stacked, summed)
    print(f"two LoRAs at {a}, {b} vs their sum: {err:.2e}")
    assert err <= 1e-5 and relative_error(stacked, base) > 1e-3
    assert np.array_equal(disabled, base)


def test_comfyui_round_trip(official, tmp_path):
    model, *_, path, _ = official
    lora = load_lora(path, model)
    comfy = tmp_path / "comfy.safetensors"
    save_comfyui(comfy, lora, model)
    tensors, _ = read_tensors(comfy)
    name = "lora_prior_unet_down_blocks_0_2_attention_attn_to_q"
    assert tensors[f"{name}.lora_up.weight"].shape == (64, 4) and tensors[f"{name}.alpha"] == 1.0
    assert "lora_prior_unet_down_blocks_0_2_attention_attn_out_proj.lora_down.weight" in tensors
    back_file = tmp_path / "back.safetensors"
    save_official(back_file, load_lora(comfy, model))
    back, _ = read_tensors(back_file)
    original, _ = read_tensors(path)
    assert back.keys() == original.keys()
    assert all(np.array_equal(back[k], original[k]) for k in original)


def test_comfyui_independent_qkv_factors(official, tmp_path):
    """q/k/v LoRAs with their own factors (as other trainers write them) pack exactly."""
    model, inputs, *_ = official
    rng = np.random.default_rng(0)
    key = "down_blocks.0.2.attention.attn.in_proj_weight"
    parts = [L.LayerFactors(rng.normal(size=(r, 64)).astype(np.float32), rng.normal(size=(64, r)).astype(np.float32),
                            alpha) for r, alpha in ((2, 1.0), (3, 3.0), (1, 0.5))]
    from cascade_jax.weights.lora_files import _pack_qkv
    packed = _pack_qkv(key, dict(enumerate(parts)))
    expected = np.concatenate([p.up @ p.down * (p.alpha / p.rank) for p in parts])
    got = packed.up @ packed.down * (packed.alpha / packed.rank)
    assert relative_error(got, expected) <= FP32_ROUNDING


def _stage_c_config(name):
    return load_config(name)[1]


def test_lite_lora_on_full_model_is_refused(tmp_path):
    full, lite = abstract_model("stage_c", _stage_c_config("stage_c")), abstract_model("stage_c",
                                                                                       _stage_c_config("stage_c_lite"))
    assert len(L.lora_targets(full)) == 128 and len(L.lora_targets(lite)) == 64
    layers = {}
    for target in L.lora_targets(lite):
        d0, d1 = target.torch_dims()
        layers[target.key] = L.LayerFactors(np.zeros((4, d1), np.float32), np.zeros((d0, 4), np.float32))
    for with_metadata in (True, False):
        path = tmp_path / f"lite_{with_metadata}.safetensors"
        save_official(path, L.LoRAWeights(layers))
        if not with_metadata:
            tensors, _ = read_tensors(path)
            from cascade_jax.weights.safetensors_io import save_safetensors
            save_safetensors(path, tensors)
        with pytest.raises(L.LoRAMismatchError) as e:
            load_lora(path, full)
        message = str(e.value)
        assert "down_blocks.0.2.attention.attn.out_proj.weight" in message
        assert "(4, 1536)" in message and "(4, 2048)" in message, message
        # Both sides' actual sizes, not a guess about the released models.
        assert "this model: ResBlocks per level: down [8, 24], up [24, 8]; widths [2048, 2048]" in message
        assert "the LoRA: input widths [1536]" in message and "3.6B" not in message


def _official_lora_order(layout: dict, filters) -> list[str]:
    """LoRA order of the official ``generator.modules()`` from the state-dict order of the released
    checkpoint: a module's LoRA follows all of its descendants (a parametrization is its last child)."""
    last, order = {}, list(layout)
    for i, key in enumerate(order):
        parts = key.split(".")
        for n in range(1, len(parts)):
            last[".".join(parts[:n])] = i
    wrapped = []
    for key in order:
        module, attr = key.rsplit(".", 1)
        if attr in ("weight", "in_proj_weight") and len(layout[key]) >= 2 and \
                (filters is None or any(f in module for f in filters)):
            if attr == "weight" or f"{module}.weight" not in layout:
                wrapped.append((last[module], -len(module), key))
    return [key for *_, key in sorted(wrapped)]


@pytest.mark.parametrize("filters", [(".attn",), None, ("mapper",)])
def test_module_order_matches_official_checkpoint(shared_dir, filters):
    layout = read_checkpoint_layout(shared_dir / "reference" / "checkpoint_layouts" / "stage_c_lite.tsv")
    model = abstract_model("stage_c", _stage_c_config("stage_c_lite"))
    assert [t.key for t in L.lora_targets(model, filters)] == _official_lora_order(layout, filters)


def test_init_is_official_and_trainable_params_are_lora_only(official):
    model, inputs, *_ = official
    before = _params(model)
    count = L.init_lora(model, "new", rank=2, key=jax.random.key(1))
    leaves = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(model, L.LoRAParam))}
    assert count == 12 and len(leaves) == 24
    assert all(not np.any(v) for k, v in leaves.items() if k.endswith("lora_down"))
    assert all(float(np.std(v)) > 0.5 for k, v in leaves.items() if k.endswith("lora_up"))  # N(0, 1)
    merged = _params(L.merged_model(model))  # lora_down = 0: the weights are unchanged to the bit
    assert merged.keys() == before.keys() and all(np.array_equal(merged[k], before[k]) for k in before)
    L.remove_lora(model, "new")
    assert not L.lora_names(model)


def _script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("lora_script", REPO / "convert" / "lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_script_and_format_conversion(official, tmp_path):
    import cascade_jax
    _, inputs, _, lora_io, path, converted = official
    script = _script()
    out = tmp_path / "merged"
    with pytest.warns(UserWarning, match="token rows"):  # the fixture also has token rows: not for Stage C
        assert script.main(["merge", "--model", str(converted), "--lora", f"{path}:1", "--output", str(out)]) == 0
    err = relative_error(nhwc_to_nchw(run(cascade_jax.load_model(out), inputs)), lora_io["out_with_lora"])
    print(f"merge script: {err:.2e} (bound {PARITY:.0e})")
    assert err <= PARITY
    comfy, back = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"
    assert script.main(["convert", "--to", "comfyui", "--lora", str(path), "--output", str(comfy),
                        "--model", str(converted)]) == 0
    # The converted file records its model, so converting back needs no --model.
    assert script.main(["convert", "--to", "official", "--lora", str(comfy), "--output", str(back)]) == 0
    ours, theirs = read_tensors(back)[0], read_tensors(path)[0]
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert script.main(["merge", "--model", str(converted), "--lora", str(tmp_path / "missing.safetensors"),
                        "--output", str(tmp_path / "x")]) == 2


def test_bad_strengths_and_full_models_are_refused_by_name_before_any_work(official, fixtures_dir, tmp_path,
                                                                           capsys):
    """Strength nan/inf wrote a broken model with rc 0; a full Stage C read as "LoHa/LoKr"."""
    from cascade_jax.weights.lora_merge import merge_loras_into_directory
    _, _, _, _, path, converted = official
    script = _script()
    for strength in ("nan", "inf", "-inf", "1e30"):
        assert script.main(["merge", "--model", str(converted), "--lora", f"{path}:{strength}", "--output",
                            str(tmp_path / "x")]) == 2
        assert f"LoRA {path} strength must be a finite number between -100 and 100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="strength must be a finite number"):
        merge_loras_into_directory(converted, [(path, float("nan"))], tmp_path / "x")
    full_model = fixtures_dir / "stage_c" / "weights.safetensors"
    assert script.main(["merge", "--model", str(converted), "--lora", str(full_model), "--output",
                        str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{full_model} is not a LoRA file: none of its" in err and "a full model's weights" in err, err
    assert not (tmp_path / "x").exists()
    model = abstract_model("stage_c", fixture(fixtures_dir, "stage_c")[0]["config"])
    with pytest.raises(ValueError, match="strength must be a finite number"):
        L.attach_lora(model, "a", load_lora(path, model), float("inf"))
