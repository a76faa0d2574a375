"""diffusers StableCascadeUNet → official Stage B / Stage C: key plan, config translation and
output parity at tiny random configs (diffusers 0.42.1, float32)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import nchw_to_nhwc, nhwc_to_nchw, relative_error
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy_file

from cascade_jax.weights.checkpoint import load_arrays, load_model, read_meta
from cascade_jax.weights.convert import convert_checkpoint
from cascade_jax.weights.diffusers_unet import (DIFFUSERS_STAGE_B, DIFFUSERS_STAGE_C, diffusers_unet_model_name,
                                                official_config_from_diffusers)
from cascade_jax.weights.formats import OFFICIAL, detect_format

torch = pytest.importorskip("torch")
unet_module = pytest.importorskip("diffusers.models.unets.unet_stable_cascade")
save_torch_file = pytest.importorskip("safetensors.torch").save_file

PARITY = 1e-4
LEVEL = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")

# Prior-like: switch_level=True exercises the bilinear 0.5x/2x rescale (no released Stage C uses it),
# and an odd latent size exercises the resize of the upscaled map onto its skip connection. The official
# per-level forms: self_attn [true, false] (the second level's attention is cross-attention only) and
# a scalar dropout. (The official tiny fixture of test_stage_c.py covers self_attn: true.)
PRIOR = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=64,
             block_out_channels=(64, 64), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 2),
             up_num_layers_per_block=(2, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 2),
             block_types_per_layer=(LEVEL, LEVEL), clip_text_in_channels=32, clip_text_pooled_in_channels=32,
             clip_image_in_channels=24, clip_seq=4, dropout=0.1, self_attn=(True, False),
             timestep_conditioning_type=("sca", "crp"), switch_level=(True,))
# Decoder-like: strided-conv rescaling, repeat mappers, attention at the two deeper levels, self-attention
# only at the deepest (self_attn per level; test_stage_b.py's official fixture covers self_attn: true).
DECODER = dict(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=64,
               block_out_channels=(16, 32, 64), num_attention_heads=(0, 2, 2), down_num_layers_per_block=(1, 1, 2),
               up_num_layers_per_block=(2, 1, 1), down_blocks_repeat_mappers=(1, 2, 1),
               up_blocks_repeat_mappers=(2, 2, 1), block_types_per_layer=(LEVEL[:2], LEVEL, LEVEL),
               clip_text_pooled_in_channels=32, clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3,
               dropout=(0.0, 0.0, 0.1), self_attn=(True, False, True), timestep_conditioning_type=("sca",),
               switch_level=None)
# A reference's output must move this much when its per-level self_attn is set to all true (it moves O(1)).
SELF_ATTN_EFFECT = 100 * PARITY


def random_diffusers_unet(config: dict, seed: int):
    """A StableCascadeUNet in eval mode with EVERY parameter drawn (its init zeroes GRN and more)."""
    torch.manual_seed(seed)
    model = unet_module.StableCascadeUNet(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / np.sqrt(p[0].numel()) if p.ndim > 1 else 0.3 * noise)
    return model.eval()


def to_official_state_dict(fmt, path) -> dict:
    """Apply a format's plan to a diffusers safetensors file, as the converter does."""
    arrays = load_file(str(path))
    plan = fmt.plan(set(arrays))
    return {key: recipe.combine([arrays[s] for s in recipe.sources]) for key, recipe in plan.items()}


def converted(name, diffusers_model, tmp_path):
    """Our model through the real converter, from a diffusers folder (config.json + safetensors)."""
    folder = tmp_path / "diffusers_unet"
    diffusers_model.save_pretrained(folder)
    out = convert_checkpoint(name, None, folder, tmp_path / "converted")  # config from config.json
    meta = read_meta(out)
    assert meta["source"]["format"] == "diffusers"
    assert meta["config"] == official_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    return load_model(out)


def assert_official_file_converts_alike(tmp_path):
    """The weights `converted` read, as an official-format file with the official config it translated
    (per-level self_attn, scalar dropout), convert to the same arrays."""
    out = tmp_path / "converted"
    official = tmp_path / "official.safetensors"
    save_numpy_file(to_official_state_dict(DIFFUSERS_STAGE_C, tmp_path / "diffusers_unet" /
                                           "diffusion_pytorch_model.safetensors"), str(official))
    from_official = convert_checkpoint("stage_c", read_meta(out)["config"], official, tmp_path / "converted_official")
    assert read_meta(from_official)["source"]["format"] == "official"
    ours, theirs = load_arrays(out), load_arrays(from_official)
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def assert_self_attn_matters(reference, run_reference, ref):
    """Per-level self_attn changes the reference's output (so matching it checks the per-level form)."""
    blocks = [m for m in reference.modules() if isinstance(m, unet_module.SDCascadeAttnBlock) and not m.self_attn]
    assert blocks, "the config has no level without self-attention"
    for block in blocks:
        block.self_attn = True
    try:
        with torch.no_grad():
            effect = relative_error(run_reference().sample.numpy(), ref)
    finally:
        for block in blocks:
            block.self_attn = False
    print(f"self_attn per level vs all true: {effect:.2e} apart (must exceed {SELF_ATTN_EFFECT:.0e})")
    assert effect > SELF_ATTN_EFFECT


def draw(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def torch_inputs(inputs: dict):
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


def test_stage_c_matches_diffusers_prior(tmp_path):
    reference = random_diffusers_unet(PRIOR, seed=0)
    model = converted("stage_c", reference, tmp_path)
    assert_official_file_converts_alike(tmp_path)
    rng = np.random.default_rng(0)
    # diffusers' `sca or zeros` only works at batch 1, so sca/crp are checked at batch 1.
    for batch, conds in ((2, ()), (1, ("sca", "crp"))):
        inputs = dict(x=draw(rng, batch, 16, 7, 10), r=rng.uniform(size=batch).astype(np.float32),
                      clip_text=draw(rng, batch, 5, 32), clip_text_pooled=draw(rng, batch, 1, 32),
                      clip_img=draw(rng, batch, 1, 24),
                      **{c: rng.uniform(size=batch).astype(np.float32) for c in conds})
        t = torch_inputs(inputs)

        def run_reference():
            return reference(t["x"], t["r"], t["clip_text_pooled"], clip_text=t["clip_text"], clip_img=t["clip_img"],
                             sca=t.get("sca"), crp=t.get("crp"))

        with torch.no_grad():
            ref = run_reference().sample.numpy()
        if not conds:
            assert_self_attn_matters(reference, run_reference, ref)
        ours = nnx.jit(lambda m, i: m(i["x"], i["r"], i["clip_text"], i["clip_text_pooled"], i["clip_img"],
                                      **{c: i[c] for c in conds}))(model, _nhwc(inputs))
        err = relative_error(nhwc_to_nchw(ours), ref)
        print(f"stage_c vs diffusers prior, batch {batch}, conds {conds}: {err:.2e} (bound {PARITY:.0e})")
        assert err <= PARITY


def test_stage_b_matches_diffusers_decoder(tmp_path):
    reference = random_diffusers_unet(DECODER, seed=1)
    model = converted("stage_b", reference, tmp_path)
    rng = np.random.default_rng(1)
    # Odd embedded size (14 → 7 → 3 → up to 6) exercises the resize onto the skip connection.
    inputs = dict(x=draw(rng, 1, 4, 28, 28), r=rng.uniform(size=1).astype(np.float32), effnet=draw(rng, 1, 16, 5, 6),
                  clip=draw(rng, 1, 1, 32), pixels=draw(rng, 1, 3, 8, 8), sca=rng.uniform(size=1).astype(np.float32))
    t = torch_inputs(inputs)

    def run_reference():
        return reference(t["x"], t["r"], t["clip"], effnet=t["effnet"], pixels=t["pixels"], sca=t["sca"])

    with torch.no_grad():
        ref = run_reference().sample.numpy()
    assert_self_attn_matters(reference, run_reference, ref)
    ours = nnx.jit(lambda m, i: m(i["x"], i["r"], i["effnet"], i["clip"], pixels=i["pixels"], sca=i["sca"]))(
        model, _nhwc(inputs))
    err = relative_error(nhwc_to_nchw(ours), ref)
    print(f"stage_b vs diffusers decoder: {err:.2e} (bound {PARITY:.0e})")
    assert err <= PARITY


def _nhwc(inputs: dict):
    return {k: jnp.asarray(nchw_to_nhwc(v)) for k, v in inputs.items()}


def test_config_translation_of_released_configs():
    """Configs shaped like the released diffusers ones (prior/, decoder_lite/; omitted keys take
    StableCascadeUNet's defaults) give the official presets."""
    from cascade_jax.models.registry import load_config

    prior = dict(block_out_channels=[2048, 2048], num_attention_heads=[32, 32], clip_text_in_channels=1280,
                 clip_image_in_channels=768, switch_level=[False], conditioning_dim=2048)
    assert official_config_from_diffusers(prior) == load_config("stage_c")[1]
    decoder_lite = dict(in_channels=4, out_channels=4, patch_size=2, conditioning_dim=1280,
                        block_out_channels=[320, 576, 1152, 1152], num_attention_heads=[0, 0, 18, 18],
                        down_num_layers_per_block=[2, 4, 14, 4], up_num_layers_per_block=[4, 14, 4, 2],
                        down_blocks_repeat_mappers=[1, 1, 1, 1], up_blocks_repeat_mappers=[2, 2, 2, 2],
                        block_types_per_layer=[LEVEL[:2], LEVEL[:2], LEVEL, LEVEL], effnet_in_channels=16,
                        pixel_mapper_in_channels=3, dropout=[0, 0, 0.1, 0.1], timestep_conditioning_type=["sca"])
    expected = {**load_config("stage_b_lite")[1], "nhead": [0, 0, 18, 18]}  # unused where a level has no attention
    assert diffusers_unet_model_name(decoder_lite) == "stage_b"
    assert official_config_from_diffusers(decoder_lite) == expected


@pytest.mark.parametrize("name, fmt", [("stage_b", DIFFUSERS_STAGE_B), ("stage_c", DIFFUSERS_STAGE_C)])
def test_plan_inverts_diffusers_single_file_converter(name, fmt, fixtures_dir, tmp_path):
    """diffusers' own official → diffusers converter, then our plan, gives back every official tensor exactly."""
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

    official = load_file(str(fixtures_dir / name / "weights.safetensors"))
    as_diffusers = convert_stable_cascade_unet_single_file_to_diffusers(
        {k: torch.from_numpy(v) for k, v in official.items()})
    path = tmp_path / "diffusers.safetensors"
    save_torch_file({k: v.contiguous() for k, v in as_diffusers.items()}, str(path))
    assert detect_format(name, set(as_diffusers)) is fmt
    back = to_official_state_dict(fmt, path)
    assert set(back) == set(official)
    for key, value in official.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_official_keys_are_not_taken_for_diffusers(fixtures_dir):
    from safetensors import safe_open

    for name in ("stage_b", "stage_c"):
        with safe_open(fixtures_dir / name / "weights.safetensors", "np") as f:
            assert detect_format(name, set(f.keys())) is OFFICIAL


def test_incomplete_qkv_is_an_error():
    keys = {"down_blocks.0.2.attention.to_q.weight", "down_blocks.0.2.attention.to_k.weight"}
    with pytest.raises(KeyError, match="to_v.weight"):
        DIFFUSERS_STAGE_C.plan(keys)
