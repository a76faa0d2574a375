"""convert/verify.py: the tool users run to trust a conversion, on both PyTorch families."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cascade_jax.weights.convert import convert_checkpoint
from cascade_jax.weights.safetensors_io import SafetensorsReader, save_safetensors
from cascade_jax.weights.verify import verify
from helpers import REPO, fixture

# A user's PyTorch module imported by path: the official Previewer's structure, written for this test.
TORCH_PREVIEWER = textwrap.dedent('''
    from torch import nn

    def _stage(c_in, c_out, up):
        conv = nn.ConvTranspose2d(c_in, c_out, 2, stride=2) if up else nn.Conv2d(c_in, c_out, 3, padding=1)
        return [conv, nn.GELU(), nn.BatchNorm2d(c_out)]

    class Previewer(nn.Module):
        def __init__(self, c_in=16, c_hidden=512, c_out=3):
            super().__init__()
            h = c_hidden
            layers = [nn.Conv2d(c_in, h, 1), nn.GELU(), nn.BatchNorm2d(h)]
            for a, b, up in [(h, h, 0), (h, h // 2, 1), (h // 2, h // 2, 0), (h // 2, h // 4, 1),
                             (h // 4, h // 4, 0), (h // 4, h // 4, 1), (h // 4, h // 4, 0)]:
                layers += _stage(a, b, up)
            self.blocks = nn.Sequential(*layers, nn.Conv2d(h // 4, c_out, 1))

        def forward(self, x):
            return self.blocks(x)
''')


@pytest.fixture()
def converted_previewer(fixtures_dir, tmp_path):
    config, _, weights = fixture(fixtures_dir, "previewer")
    (tmp_path / "user_code").mkdir()
    (tmp_path / "user_code" / "torch_previewer.py").write_text(TORCH_PREVIEWER)
    return convert_checkpoint("previewer", config["config"], weights, tmp_path / "pv"), weights, tmp_path


def test_verify_against_user_module(converted_previewer):
    out, _, tmp = converted_previewer
    report = verify(out, "torch_previewer:Previewer", torch_path=tmp / "user_code", batch=2, size=5)
    assert set(report) == {"out"}
    abs_err, rel_err = report["out"]
    print(f"previewer verify: max|diff| {abs_err:.2e}, relative {rel_err:.2e}")
    assert rel_err <= 1e-4


def test_verify_cli_fails_on_different_weights(converted_previewer):
    out, weights, tmp = converted_previewer
    reader = SafetensorsReader(weights)
    rng = np.random.default_rng(1)
    other = {k: (np.array(reader.get(k)) + rng.normal(0, 0.1, reader.shape(k)).astype(np.float32)
                 if reader.dtype(k) == np.float32 and "running_var" not in k else np.array(reader.get(k)))
             for k in reader.keys()}
    save_safetensors(tmp / "other.safetensors", other)
    cmd = [sys.executable, str(REPO / "convert" / "verify.py"), "--converted", str(out),
           "--torch", "torch_previewer:Previewer", "--torch-path", str(tmp / "user_code")]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run(cmd + ["--checkpoint", str(tmp / "other.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 1 and "FAILED" in bad.stdout, bad.stdout + bad.stderr
    missing = subprocess.run(cmd[:-4] + ["--torch", "no_such_module:X"], capture_output=True, text=True)
    assert missing.returncode == 2 and "error:" in missing.stderr


def test_verify_diffusers_unet_folder(tmp_path):
    """A diffusers-format folder: convert (config.json read and translated), then verify with diffusers."""
    pytest.importorskip("diffusers")
    from test_diffusers_unet import DECODER, random_diffusers_unet

    folder = tmp_path / "decoder"
    random_diffusers_unet(DECODER, seed=3).save_pretrained(folder, safe_serialization=True)
    out = convert_checkpoint("stage_b", None, folder, tmp_path / "stage_b")
    report = verify(out, "diffusers:StableCascadeUNet", checkpoint=folder, batch=2, size=24)
    abs_err, rel_err = report["out"]
    print(f"stage_b diffusers verify: max|diff| {abs_err:.2e}, relative {rel_err:.2e}")
    assert rel_err <= 1e-4


def test_verify_transformers_text_encoder_folder(tmp_path):
    """A transformers CLIPTextModelWithProjection folder (model.safetensors + config.json)."""
    transformers = pytest.importorskip("transformers")
    from clip_testing import randomise_torch_model
    from test_clip_text import tiny_config

    folder = tmp_path / "text_encoder"
    model = randomise_torch_model(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**tiny_config())))
    model.save_pretrained(folder, safe_serialization=True)
    out = convert_checkpoint("clip_text", None, folder, tmp_path / "clip_text")
    report = verify(out, "transformers:CLIPTextModelWithProjection", checkpoint=folder, batch=2)
    assert set(report) == {"hidden_pre_norm", "text_embeds"}
    for name, (abs_err, rel_err) in report.items():
        print(f"clip_text verify {name}: max|diff| {abs_err:.2e}, relative {rel_err:.2e}")
        assert rel_err <= 1e-4
