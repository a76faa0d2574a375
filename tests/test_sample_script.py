"""sample/generate.py end to end in a subprocess: tiny random weights, 128x128, 2 + 2 steps."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_jax.pipelines.outputs import read_png_metadata

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sample" / "generate.py"


def generate(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_text_to_image_writes_pngs_with_metadata(tmp_path):
    out = tmp_path / "out"
    result = generate("text2img", "--random", "tiny", "--prompt", "a lighthouse on a cliff", "--height", 128,
                      "--width", 128, "--prior-steps", 2, "--decoder-steps", 2, "--seed", 7, "--num-images", 2,
                      "--preview", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    assert "RANDOM weights" in result.stdout
    for stage in ("stage_c", "stage_b"):  # compile and sampling times are reported apart
        assert re.search(rf"{stage}: compile \d+\.\d+s, sampling \d+\.\d+s \(2 steps\)", result.stdout), result.stdout

    paths = sorted(out.glob("text2img_*.png"))
    assert [p.name for p in paths] == ["text2img_00_seed7.png", "text2img_01_seed8.png"]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(im.shape == (128, 128, 3) and im.dtype == np.uint8 for im in images)
    assert not np.array_equal(images[0], images[1])  # one seed per image
    meta = read_png_metadata(paths[1])
    assert meta["prompt"] == "a lighthouse on a cliff" and json.loads(meta["seed"]) == 8
    assert meta["mode"] == "text2img" and meta["weights"] == "random:tiny"
    prior, decoder = json.loads(meta["prior"]), json.loads(meta["decoder"])
    assert (prior["steps"], prior["cfg"], prior["shift"], prior["sampler"]) == (2, 4.0, 2.0, "ddpm")
    assert (decoder["steps"], decoder["cfg"], decoder["shift"]) == (2, 1.1, 1.0)
    previews = sorted(out.glob("preview_*.png"))
    assert len(previews) == 2 and np.asarray(Image.open(previews[0])).shape == (24, 24, 3)  # 8x the 3x3 latent


def test_bad_size_exits_2_with_the_message_before_loading_models(tmp_path):
    result = generate("text2img", "--random", "tiny", "--height", 130, "--width", 128, "--out", tmp_path)
    assert result.returncode == 2
    assert "nearest valid size is 128x128" in result.stderr
    assert "Using RANDOM weights" not in result.stdout  # failed before building anything
    assert not list(tmp_path.glob("*.png"))


def load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_other_bad_arguments_exit_2(tmp_path, capsys):
    script = load_script()
    for argv, message in [
        (["img2img", "--random", "tiny", "--image", str(tmp_path / "x.png"), "--strength", "0"],
         "--strength must be in (0, 1]"),
        (["variation", "--random", "tiny"], "variation needs --image"),
        (["text2img", "--random", "tiny", "--num-images", "0"], "--num-images must be at least 1"),
        (["text2img", "--random", "tiny", "--width", "100000"], "nearest valid size is 1024x8192"),
    ]:
        with pytest.raises(SystemExit) as info:
            script.parse_args(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def _refused(script, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        script.parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err, err
    assert "Traceback" not in err


def test_inputs_and_outputs_are_checked_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Each of these used to fail only after the models loaded (or after sampling)."""
    script = load_script()
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "taken").write_text("a file")
    out = ["--out", str(tmp_path / "out")]
    base = ["img2img", "--random", "tiny", "--prompt", "x", *out]
    for argv, message in [
        ([*base, "--image", str(tmp_path / "missing.png")], "no such file"),
        ([*base, "--image", str(tmp_path)], "is a folder"),
        ([*base, "--image", str(corrupt)], "not an image file PIL can read"),
        (["text2img", "--random", "tiny", "--out", str(tmp_path / "taken")], "is a file, not a folder"),
        (["text2img", "--random", "tiny", "--out", str(tmp_path / "taken" / "sub")], "cannot be created: "),
        (["text2img", "--random", "tiny", "--seed", "-1", *out], "--seed must be an integer in [0, 2**32 - 1]"),
        (["text2img", "--random", "tiny", "--seed", str(1 << 32), *out], "--seed must be an integer"),
        (["text2img", "--random", "tiny", "--seed", str((1 << 32) - 1), "--num-images", "2", *out],
         "--seed must be an integer in [0, 2**32 - 2]"),
        (["text2img", "--random", "tiny", "--decoder-steps", "0", *out], "--decoder-steps must be a positive integer"),
        (["text2img", "--random", "tiny", "--prior-shift", "0", *out], "--prior-shift must be a finite number"),
        (["text2img", "--random", "tiny", "--decoder-shift", "nan", *out], "--decoder-shift must be a finite"),
        (["text2img", "--random", "tiny", "--prior-cfg", "inf", *out], "--prior-cfg must be"),
        (["text2img", "--random", "tiny", "--decoder-t-start", "1.5", *out], "--decoder-t-start must be"),
        (["text2img", "--random", "tiny", "--decoder-cfg-t-stop", "-0.5", *out], "--decoder-cfg-t-stop must be"),
        (["text2img", "--random", "tiny", "--prior-cfg-t-start", "2", *out], "--prior-cfg-t-start must be"),
        (["reconstruct", "--random", "tiny", "--image", str(good), "--height", "7", *out], "nearest valid size"),
        (["img2img", "--random", "tiny", "--image", str(good), "--width", "100", *out], "nearest valid size"),
    ]:
        _refused(script, capsys, argv, message)
    assert not (tmp_path / "out").exists()  # nothing was created for a refused run
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 128x128 is then a "decompression bomb"
    _refused(script, capsys, [*base, "--image", str(good)], "decompression bomb")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _refused(script, capsys, ["text2img", "--random", "tiny", "--out", str(locked)], "is not writable")


def test_earlier_results_are_kept_unless_overwrite(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "out"
    out.mkdir()
    (out / "text2img_00_seed3.png").write_bytes(b"earlier result")
    argv = ["text2img", "--random", "tiny", "--height", "64", "--width", "64", "--prior-steps", "2",
            "--decoder-steps", "2", "--seed", "3", "--out", str(out)]
    assert script.main(argv) == 0
    err = capsys.readouterr().err
    assert "Stage C" in err and "Stage B" in err and "2/2" in err  # the per-stage progress bars
    assert (out / "text2img_00_seed3.png").read_bytes() == b"earlier result"
    assert np.asarray(Image.open(out / "text2img_00_seed3-1.png")).shape == (64, 64, 3)
    run = script.parse_args([*argv, "--overwrite"])
    assert [p.name for p in run.paths] == ["text2img_00_seed3.png"]


def test_a_failed_run_leaves_no_output_folder(tmp_path, capsys):
    """Every failed run left an empty output folder; it is now made when there is a result."""
    script = load_script()
    (tmp_path / "empty").mkdir()
    out = tmp_path / "new" / "out"
    assert script.main(["text2img", "--weights", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no tokenizer/ folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
