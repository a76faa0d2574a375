"""ControlNet sampling: the control window and strength on the tiny random Stage C's whole sampling loop
(zero-initialised ControlNet and strength 0 leave the sample unchanged), fit checks, and
sample/controlnet.py end to end (inpainting on the tiny random cascade: result + control image)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cascade_jax.models.controlnet import ControlNet
from cascade_jax.models.random_init import random_model
from cascade_jax.pipelines import PRIOR_DEFAULTS
from cascade_jax.pipelines.controlnet import (ControlledStageC, ControlSettings, _ControlledPrior, check_fits,
                                              control_array, resblock_widths)
from cascade_jax.pipelines.loading import pipeline_set
from cascade_jax.pipelines.stage_runner import StageRunner
from helpers import relative_error
from test_controlnet_hints import photo_like

REPO = Path(__file__).resolve().parents[1]
UNCHANGED = 1e-5  # relative: the controlled program is another XLA program (other fusion), so not bit-equal
SETTINGS = PRIOR_DEFAULTS.replace(steps=3)
SHAPE = (4, 4, 16)  # Stage C latent of a 128x128 image


@pytest.mark.parametrize("settings", [PRIOR_DEFAULTS.replace(steps=6), PRIOR_DEFAULTS.replace(steps=5, t_start=0.6)])
def test_control_window_selects_exactly_its_steps(settings):
    r = settings.plan().r
    for start, stop in [(0, None), (2, 4), (3, 3), (4, None), (0, 1), (1, 99)]:
        strength, high, low = control_array(settings, ControlSettings(0.5, start, stop), 2)[0].view(np.float32)
        active = (r <= high) & (r > low)
        expected = [start <= i < (len(r) if stop is None else stop) for i in range(len(r))]
        assert active.tolist() == expected and strength == 0.5, (start, stop)


@pytest.fixture(scope="module")
def stage_c():
    _, config = pipeline_set("tiny")["stage_c"]
    return random_model("stage_c", config, seed=0)


@pytest.fixture(scope="module")
def runs(stage_c):
    """Sampling runs of the whole Stage C loop (3 steps, cfg 4) with and without control."""
    rng = np.random.default_rng(0)
    cond = {"clip_text": rng.standard_normal((2, 5, 32), np.float32),
            "clip_text_pooled": rng.standard_normal((2, 1, 32), np.float32),
            "clip_img": np.zeros((2, 1, 24), np.float32)}
    uncond = {k: np.zeros_like(v) for k, v in cond.items()}
    plain = StageRunner("Stage C", stage_c)
    controlled = StageRunner("Stage C", ControlledStageC(stage_c))
    widths = resblock_widths(stage_c)
    config = dict(c_in=1, c_proj=widths[0], proj_blocks=list(range(len(widths))), bottleneck_mode="simple")
    hint = jax.numpy.asarray(rng.random((2, 4, 4, 1), np.float32))
    trained = random_model("controlnet", config, seed=1)(hint)  # every layer random, residuals non-zero
    with jax.threefry_partitionable(False):  # the classic RNG lowering compiles ~3x faster on a CPU
        fresh = ControlNet(**config, rngs=nnx.Rngs(0))(hint)  # official init: zero output projections

    def run(residuals=None, control=ControlSettings()):
        runner = plain if residuals is None else _ControlledPrior(controlled, residuals, control)
        return np.asarray(runner(SETTINGS, SHAPE, [0, 1], cond, uncond))
    return run, trained, fresh


def test_zero_initialised_controlnet_and_strength_zero_change_nothing(runs):
    run, trained, fresh = runs
    base = run()
    errors = {"zero-initialised ControlNet": relative_error(run(fresh), base),
              "strength 0": relative_error(run(trained, ControlSettings(strength=0.0)), base),
              "empty step window": relative_error(run(trained, ControlSettings(start=2, stop=2)), base)}
    print({k: f"{v:.1e}" for k, v in errors.items()})
    assert all(err <= UNCHANGED for err in errors.values()), errors


def test_strength_and_window_act(runs):
    run, trained, _ = runs
    base, full = run(), run(trained)
    late = run(trained, ControlSettings(start=1))
    half = run(trained, ControlSettings(strength=0.5))
    for name, out in [("full", full), ("late", late), ("half", half)]:
        assert relative_error(out, base) > 1e-2, name
    assert relative_error(late, full) > 1e-3 and relative_error(half, full) > 1e-3


def test_fit_checks_name_the_problem(stage_c):
    def shapes_only(**config):
        return nnx.eval_shape(lambda: ControlNet(**config, bottleneck_mode="simple", rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="1 channels but this ControlNet takes 4"):
        check_fits(shapes_only(c_in=4, c_proj=64, proj_blocks=[0]), stage_c, "canny")
    with pytest.raises(ValueError, match="do not fit this Stage C"):
        check_fits(shapes_only(c_in=1, c_proj=64, proj_blocks=[0, 63]), stage_c, "canny")
    with pytest.raises(ValueError, match="do not fit this Stage C"):
        check_fits(shapes_only(c_in=1, c_proj=32, proj_blocks=[0]), stage_c, "canny")
    with pytest.raises(ValueError, match="unknown control"):
        check_fits(None, stage_c, "depth")


def _script(*args):
    return subprocess.run([sys.executable, str(REPO / "sample" / "controlnet.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)


def test_script_inpainting_writes_result_and_control_image(tmp_path):
    image = photo_like(128, 128)
    mask = np.zeros((128, 128), np.uint8)
    mask[30:90, 20:100] = 255
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    result = _script("--control", "inpainting", "--random", "tiny", "--image", tmp_path / "photo.png", "--mask",
                     tmp_path / "mask.png", "--prompt", "a red car", "--prior-steps", 2, "--decoder-steps", 2,
                     "--seed", 3, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    generated = np.asarray(Image.open(out / "inpainting_00_seed3.png"))
    control = np.asarray(Image.open(out / "control_00_seed3.png"))
    assert generated.shape == control.shape == (128, 128, 3)
    inside = mask > 0
    assert np.all(control[inside] == 255) and np.array_equal(control[~inside], image[~inside])
    assert np.array_equal(generated[~inside], image[~inside])  # the unmasked part is kept
    assert not np.array_equal(generated[inside], control[inside])  # the masked part is generated


def test_script_refuses_bad_arguments_before_loading(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("controlnet_script", REPO / "sample" / "controlnet.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    Image.fromarray(photo_like(64, 64)).save(tmp_path / "photo.png")
    # Huge images (1-bit PNGs of a few kB) are refused from their header, before any work.
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 144 megapixels
    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")  # under PIL's limit, over the largest side
    for args, message in [(["--control", "inpainting"], "inpainting needs --mask"),
                          (["--control", "identity"], "identity needs --faces"),
                          (["--control", "canny", "--t-start", "0"], "--t-start must be in (0, 1]"),
                          (["--control", "canny", "--control-start", "-1"], "control start must be a step index"),
                          (["--control", "canny", "--image", tmp_path / "none.png"], "is not a file"),
                          (["--control", "canny", "--image", tmp_path / "bomb.png"], "possible decompression bomb"),
                          (["--control", "canny", "--image", tmp_path / "huge.png"],
                           "height=9000 is not supported: sides must be multiples of 8 between 64 and 8192; the "
                           "nearest valid size is 8192x8192 (HxW); it comes from the input image's size 9000x9000"),
                          # An absurd strength and an empty control window, by name.
                          (["--control", "canny", "--strength", "1e30"], "control strength must be a finite number "
                                                                         "between -100 and 100 (1 is full strength)"),
                          (["--control", "canny", "--control-start", "15", "--control-stop", "5"],
                           "the control window is empty: control start 15 >= control stop 5"),
                          (["--control", "canny", "--control-start", "20"],
                           "control start 20 is past the last Stage C step (20 steps: 0 .. 19)"),
                          (["--control", "inpainting", "--mask", tmp_path / "photo.png", "--t-start", "0.5",
                            "--control-start", "12"], "control start 12 is past the last Stage C step (10 steps")]:
        argv = [*map(str, args), "--random", "tiny", "--out", str(tmp_path / "o")]
        argv += [] if "--image" in args else ["--image", str(tmp_path / "photo.png")]
        with pytest.raises(SystemExit) as info:
            script.parse_args(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "o").exists()  # no output folder for a refused run
