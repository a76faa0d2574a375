"""sample/generate.py end to end in a subprocess: tiny random weights, 128x128, 2 + 2 steps."""

from __future__ import annotations

import importlib.util
import json
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


def test_other_bad_arguments_exit_2(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
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
