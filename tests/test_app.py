"""The web app (sample/app.py) driven through its API with gradio_client: a subprocess serving the demo
weights at 128x128 with 2 + 2 steps (tests/app_testing.py), plus its request checks alone."""

from __future__ import annotations

import json
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS
from cascade_jax.pipelines.outputs import read_png_metadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample"))
import app_parts  # noqa: E402
import app_testing  # noqa: E402

REQUEST_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def app(request, tmp_path_factory):
    yield from app_testing.shared_app(request, tmp_path_factory)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def text_to_image(client, **fields):
    # The page's defaults (128x128, 2 + 2 steps, seed 0, one image) except what is given.
    return client.submit(**{"prompt": "a red circle", "negative_prompt": "", **fields}, api_name="/text_to_image")


def test_text_to_image_returns_the_png_with_metadata_and_reports_progress(app, client):
    start = time.perf_counter()
    job = text_to_image(client, prompt="a lighthouse on a cliff", seed=11)
    preview, status, gallery, files = job.result(timeout=REQUEST_TIMEOUT_S)
    first_s = time.perf_counter() - start

    assert len(gallery) == 1 and len(files) == 1
    with Image.open(files[0]) as image:
        assert image.format == "PNG" and image.size == (128, 128)
    meta = read_png_metadata(files[0])
    assert meta["prompt"] == "a lighthouse on a cliff" and meta["seed"] == "11" and meta["mode"] == "text2img"
    assert json.loads(meta["prior"])["steps"] == 2 and json.loads(meta["decoder"])["steps"] == 2
    assert meta["weights"] == "demo" and (meta["height"], meta["width"]) == ("128", "128")
    # The download is the file the app wrote, byte for byte (as sample/generate.py writes it).
    written = sorted(app.out.glob("*/text2img_00_seed11.png"))
    assert len(written) == 1 and written[0].read_bytes() == Path(files[0]).read_bytes()
    assert Path(gallery[0]["image"]).read_bytes() == written[0].read_bytes()

    statuses = [out[1] for out in job.outputs()]
    assert any("Stage C: compiling for 128x128" in s for s in statuses), statuses  # the first request compiles
    for expected in ("Stage C: step 1/2", "Stage C: step 2/2", "Stage B: step 2/2"):
        assert expected in statuses, statuses
    assert "stage_c: compile" in status and "stage_b: compile" in status, status
    previews = [out[0] for out in job.outputs() if isinstance(out[0], str)]  # Stage C previews, as images
    assert previews, "no Stage C preview was shown"
    with Image.open(previews[-1]) as image:
        assert image.size[0] >= 24

    start = time.perf_counter()
    _, status, _, files = text_to_image(client, seed=12).result(timeout=REQUEST_TIMEOUT_S)
    later_s = time.perf_counter() - start
    assert "stage_c: compiled earlier" in status and "stage_b: compiled earlier" in status, status
    assert read_png_metadata(files[0])["seed"] == "12"
    print(f"\nlatency at 128x128, 2 + 2 steps, demo weights: first request {first_s:.1f}s "
          f"(compiling), next {later_s:.2f}s")


def test_bad_size_shows_the_pipeline_message_and_the_app_keeps_serving(client):
    with pytest.raises(AppError, match="height=130 is not supported.*nearest valid size is 128x128"):
        text_to_image(client, height=130).result(timeout=REQUEST_TIMEOUT_S)
    with pytest.raises(AppError, match="greater than maximum value 4"):  # the page's bound holds for the API too
        text_to_image(client, num_images=5).result(timeout=REQUEST_TIMEOUT_S)
    _, status, _, files = text_to_image(client, seed=3).result(timeout=REQUEST_TIMEOUT_S)
    assert status.startswith("Done") and len(files) == 1


def test_bad_uploads_and_long_prompts_are_explained_on_the_page(app, client, tmp_path):
    """A non-image upload showed gradio's error with the server's cache path, an upload had no size
    limit (the test app's --max-upload-mb is 1), a truncated prompt's warning reached only the server's log,
    and every failed request left an empty folder."""
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError) as info:
        client.predict(image=handle_file(str(tmp_path / "notes.png")), prompt="", api_name="/image_variation")
    assert "the uploaded file notes.png: not an image file PIL can read" in str(info.value)
    assert "gradio" not in str(info.value).lower() and str(tmp_path) not in str(info.value)
    (tmp_path / "big.png").write_bytes(bytes(1_500_000))
    with pytest.raises(Exception, match="(?i)size|large"):  # the upload itself is refused
        client.predict(image=handle_file(str(tmp_path / "big.png")), prompt="", api_name="/image_variation")

    _, status, _, _ = text_to_image(client, prompt="a red circle " * 40).result(timeout=REQUEST_TIMEOUT_S)
    assert status.startswith("Done") and re.search(r"Note: the prompt \('a red circle a red.*'\.\.\.\) has 120 tokens; "
                                                   r"CLIP reads the first \d+, the rest is ignored", status), status
    assert all(any(folder.iterdir()) for folder in app.out.iterdir())  # no empty folder from the failed requests


def test_two_concurrent_requests_both_succeed(client):
    jobs = [text_to_image(client, prompt=f"request {seed}", seed=seed) for seed in (21, 22)]
    results = [job.result(timeout=REQUEST_TIMEOUT_S) for job in jobs]
    metas = [read_png_metadata(files[0]) for _, _, _, files in results]
    assert [(m["prompt"], m["seed"]) for m in metas] == [("request 21", "21"), ("request 22", "22")]
    pixels = [np.asarray(Image.open(files[0])) for _, _, _, files in results]
    assert not np.array_equal(pixels[0], pixels[1])  # each request got its own result, not the other's


# ---- the request checks, without a server ---------------------------------------------------------
# Only the pipeline's default sampler settings are read while checking a request (here: a weights
# folder's sampling.json that starts Stage B at t 0.9 with cfg 3).
PIPE_DEFAULTS = types.SimpleNamespace(prior_defaults=PRIOR_DEFAULTS,
                                      decoder_defaults=DECODER_DEFAULTS.replace(t_start=0.9, cfg=3.0))


def service(tmp_path, **settings):
    lora = tmp_path / "style.safetensors"
    lora.touch()  # a request checks that the file exists; its content is read only when it is applied
    return app_parts.Service(PIPE_DEFAULTS, source_argv=["--random", "tiny"], out_dir=tmp_path / "results",
                             max_images=2, loras={"style.safetensors": str(lora)}, **settings)


def test_requests_are_checked_as_the_command_line_checks_them(tmp_path):
    fields = {"prompt": "--looks like a flag", "height": 128, "width": 136.0, "num_images": 2, "seed": 4,
              "prior_steps": 3, "prior_sampler": "ddim", "lora_1": "style.safetensors", "lora_1_strength": 0.5}
    app = service(tmp_path)
    args = app.generate_args("text2img", fields)
    assert args.prompt == "--looks like a flag" and (args.height, args.width) == (128, 136)
    assert args.seeds == [4, 5] and args.prior.steps == 3 and args.prior.sampler == "ddim"
    assert args.prior.cfg == PRIOR_DEFAULTS.cfg and (args.decoder.t_start, args.decoder.cfg) == (0.9, 3.0)
    assert app.generate_args("text2img", {**fields, "decoder_cfg": 1.5}).decoder == \
        PIPE_DEFAULTS.decoder_defaults.replace(cfg=1.5)
    assert args.lora == [f"{tmp_path / 'style.safetensors'}:0.5"]
    other = app.generate_args("text2img", fields)
    assert other.paths[0].parent != args.paths[0].parent  # a folder per request: no shared file names
    # Results are served by path: the folder names are unguessable, and made only for results.
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{16}", args.paths[0].parent.name), args.paths[0]
    assert not (tmp_path / "results").exists()

    for bad, message in (({"height": 100}, "nearest valid size is 96x136"), ({"num_images": 3}, "at most 2 images"),
                         ({"width": 128.5}, "width must be a whole number"), ({"lora_1": "x"}, "unknown LoRA 'x'"),
                         ({"prior_steps": 0}, "--prior-steps"),
                         ({"lora_1_strength": float("nan")}, "LoRA .*style.safetensors strength must be a finite")):
        with pytest.raises(ValueError, match=message):
            service(tmp_path).generate_args("text2img", {**fields, **bad})
    with pytest.raises(ValueError, match="img2img needs an input image"):
        service(tmp_path).generate_args("img2img", {"prompt": "x", "seed": 0})


def test_requests_over_the_size_cap_are_refused_before_any_work(tmp_path):
    """A 4004x4004 control image held the device for minutes and the app died at 16.9 GB."""
    app = service(tmp_path, max_side=256)
    with pytest.raises(ValueError, match=r"512x256 \(HxW\) has a side over this server's --max-side of 256 pixels; "
                                         r"the largest size of that shape within it is 256x128$"):
        app.generate_args("text2img", {"prompt": "x", "seed": 0, "height": 512, "width": 256})
    Image.new("RGB", (400, 304)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="304x400 .*; untick \"use the input image's size\" and set a size"):
        app.generate_args("img2img", {"prompt": "x", "seed": 0, "image": str(tmp_path / "photo.png"),
                                      "use_image_size": True})

    app.controlnets = {"canny": app_parts.ControlNetEntry(pipeline=None, source="random")}
    fields = {"control": "canny", "seed": 0, "prior_steps": 2, "decoder_steps": 2, "use_image_size": True,
              "control_strength": 1.0}
    huge = np.zeros((4004, 4004, 3), np.uint8)  # pages the OS never touches: no memory used
    for changes, image, message in [({}, huge, r"4000x4000 \(HxW\) has a side over this server's --max-side"),
                                    ({"use_image_size": False, "height": 2048, "width": 256}, huge[:64, :64],
                                     "2048x256 .* over this server's --max-side"),
                                    ({"control_strength": 1e30}, huge[:64, :64], "control strength must be a finite"),
                                    ({"control": "depth"}, huge[:64, :64], "no ControlNet for 'depth'")]:
        with pytest.raises(ValueError, match=message):
            next(app.run_controlnet({**fields, **changes}, image, None))
        assert not app.lock.locked()
    assert not (tmp_path / "results").exists()  # a refused request leaves no folder


def test_uploads_are_checked_from_their_header_with_the_users_file_name(tmp_path):
    """Gradio's own error for a huge or non-image upload named the server's cache path."""
    Image.new("1", (5000, 5000)).save(tmp_path / "big.png")  # 25 megapixels, a few kB
    (tmp_path / "notes.png").write_text("not an image")
    upload = lambda path, name: types.SimpleNamespace(path=str(path), orig_name=name)
    app_parts.check_upload(upload(tmp_path / "big.png", "big.png"), 30_000_000)
    app_parts.check_upload(None, 1)
    for payload, message in [
            (upload(tmp_path / "big.png", "big.png"), "the uploaded file big.png is 5000x5000 = 25.0 megapixels, over "
                                                      "the limit of 24.0 megapixels"),
            (upload(tmp_path / "notes.png", "notes.png"), "^the uploaded file notes.png: not an image file PIL can read$"),
            (upload(tmp_path / "gone.png", "gone.png"), "gone.png is no longer on this server \\(uploads are deleted "
                                                        "after 60 minutes\\): upload it again"),
            (types.SimpleNamespace(background=(tmp_path / "notes.png").read_bytes(), composite=None, layers=[]),
             "the uploaded file the drawn image: not an image")]:
        with pytest.raises(ValueError, match=message):
            app_parts.check_upload(payload, 24_000_000, 60)


def test_random_seed_size_hint_and_drawn_mask():
    seeds = {app_parts.pick_seed(0, True, 4) for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s <= 2**32 - 4 for s in seeds)
    assert app_parts.pick_seed(7.0, False, 1) == 7
    assert "Stage C latent 3x3, Stage B latent 32x32" in app_parts.size_hint(128, 128)
    assert "nearest valid size is 720x1280" in app_parts.size_hint(721, 1281)

    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 5:7, 3] = 255
    background = np.full((8, 8, 4), 200, np.uint8)
    mask = app_parts.mask_from_editor({"background": background, "layers": [layer], "composite": background})
    assert mask.dtype == np.uint8 and mask.sum() == 4 * 255 and mask[2, 5] == 255
    assert app_parts.mask_from_editor({"background": background, "layers": [np.zeros_like(layer)]}) is None
    assert app_parts.image_from_editor({"background": background}).shape == (8, 8, 3)


def test_without_weights_the_app_uses_the_demo_or_says_what_to_pass(monkeypatch):
    import app as app_script  # sample/app.py (gradio is imported only when the page is built)

    asked = []

    def missing(source, **kwargs):
        asked.append((source, kwargs))
        raise FileNotFoundError(f"{source}: no such folder")

    monkeypatch.setattr(app_script.StableCascadePipeline, "from_pretrained", missing)
    with pytest.raises(SystemExit, match=r"(?s)demo weights cannot be loaded.*Pass --weights DIR.*or --random tiny"):
        app_script.load_pipeline(app_script.build_parser().parse_args([]))
    assert asked == [("demo", {"lite": False, "dtype": "float32"})]
    with pytest.raises(SystemExit, match="^error: /w: no such folder$"):
        app_script.load_pipeline(app_script.build_parser().parse_args(["--weights", "/w"]))
    assert asked[-1] == ("/w", {"lite": False, "dtype": "bfloat16"})
