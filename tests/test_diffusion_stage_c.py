"""The official DDIM trajectory (gdf fixture: 6 steps, cfg 4, cfg_rho 0.7, shift 2, zero
unconditional inputs) reproduced with our Stage C on the stage_c fixture weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cascade_jax.diffusion import sample
from helpers import fixture, nchw_to_nhwc, relative_error

TOL = 1e-4  # the fixture's bound; measured ~2e-6 on the CPU


@pytest.fixture(scope="module")
def stage_c(fixtures_dir, tmp_path_factory):
    pytest.importorskip("cascade_jax.models.stage_c")
    pytest.importorskip("cascade_jax.weights.convert")
    from helpers import load_fixture_model

    config, io, weights = fixture(fixtures_dir, "stage_c")
    return load_fixture_model("stage_c", config["config"], weights, tmp_path_factory.mktemp("stage_c")), io


def test_ddim_trajectory_matches_official(stage_c, fixtures_dir):
    model, io = stage_c
    gdf_config, gdf_io, _ = fixture(fixtures_dir, "gdf")
    settings = gdf_config["sampling"]
    assert settings["sampler"] == "DDIM eta=0"
    conditions = {k: jnp.asarray(io[k]) for k in ("clip_text", "clip_text_pooled", "clip_img")}

    @nnx.jit
    def run(model, conditions, x_init):
        return sample(lambda x, r, **c: model(x, r, **c), conditions, None, x_init=x_init,
                      steps=settings["timesteps"], cfg=settings["cfg"], cfg_rho=settings["cfg_rho"],
                      shift=settings["shift"], t_start=settings["t_start"], t_end=settings["t_end"],
                      sampler="ddim", eta=0.0, return_trajectory=True)

    out = run(model, conditions, jnp.asarray(nchw_to_nhwc(gdf_io["x_init"])))
    ref_xs = np.stack([nchw_to_nhwc(x) for x in gdf_io["xs"]])
    ref_x0s = np.stack([nchw_to_nhwc(x) for x in gdf_io["x0s"]])
    for i in range(settings["timesteps"]):
        assert relative_error(out.xs[i], ref_xs[i]) < TOL, f"x after step {i}"
        assert relative_error(out.x0s[i], ref_x0s[i]) < TOL, f"predicted x0 at step {i}"
    assert relative_error(out.x0, ref_x0s[-1]) < TOL  # the stage result: last predicted x0
