"""Sample collages during training (``sample_every``): tiny Stage C and Stage B runs write
``samples/step_N.png`` of the expected size from the current weights, also logged to TensorBoard as
images; Stage C prompts with captions of the training data unless ``sample_prompts`` says otherwise;
sampling leaves the training losses exactly as they are without it."""

from __future__ import annotations

import io
import json
import logging
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from training_testing import ImageData

from cascade_jax.data import global_batch
from cascade_jax.sharding import make_mesh
from cascade_jax.training import build_run, load_config, train
from cascade_jax.training.hooks import StepInfo
from cascade_jax.training.loop import host_rng
from cascade_jax.training.samples import CAPTION_HEIGHT, PAD, SampleCollage, collage, false_colour

UPDATES, EVERY = 4, 2


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def tiny(stage: str, tmp_path, name: str, *overrides):
    return load_config(f"tiny_{stage}", [
        f"experiment_id={name}", f"checkpoint_path={tmp_path / 'ckpt'}", f"output_path={tmp_path / 'out'}",
        f"updates={UPDATES}", "save_every=1000", "sample_steps=2", *overrides])


def collages(tmp_path, name: str) -> dict:
    folder = tmp_path / "out" / name / "samples"
    return {p.name: Image.open(p) for p in sorted(folder.iterdir())}


class CaptionedImageData(ImageData):
    """ImageData that names captions of its dataset, as the training loader does (``sample_captions``)."""

    CAPTIONS = ["a red square", "a blue square", "a green square"]

    def sample_captions(self, count: int) -> list[str]:
        return self.CAPTIONS[:count]


def tensorboard_images(log_dir: Path, tag: str = "samples") -> dict[int, np.ndarray]:
    """{step: RGB array} of the images under ``tag`` in the TensorBoard event files of ``log_dir``
    (TFRecord framing: length u64, its CRC u32, the Event proto, its CRC u32)."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag and value.HasField("image"):
                    image = Image.open(io.BytesIO(value.image.encoded_image_string))
                    found[event.step] = np.asarray(image.convert("RGB"))
    return found


def test_stage_c_collages_leave_training_unchanged(tmp_path, caplog):
    run = train(tiny("c", tmp_path, "with", f"sample_every={EVERY}"), data=CaptionedImageData(4, 64),
                mesh=one_device(), progress=False)
    found = collages(tmp_path, "with")
    assert list(found) == ["step_00000002.png", "step_00000004.png"]
    # 64-px run: 2x2 Stage C latents (the EfficientNet's /32), 16x16 previews (x8), tiles upscaled 8x to 128;
    # the dataset's 3 captions in a row: 3*128 + 4*2 = 392 wide, 128 + 2*2 + 14 (captions) = 146 high.
    assert {im.size for im in found.values()} == {(392, 146)}
    meta = found["step_00000004.png"].text
    assert meta["decoder"] == "previewer" and meta["weights"] == "params" and meta["step"] == "4"
    assert json.loads(meta["captions"]) == CaptionedImageData.CAPTIONS and meta["caption_source"] == "dataset"
    first, last = (np.asarray(im.convert("RGB")) for im in found.values())
    assert not np.array_equal(first, last)  # sampled from the weights of that update, same noise
    # The same pictures in TensorBoard's Images tab.
    logged = tensorboard_images(tmp_path / "out" / "with" / "logs")
    assert sorted(logged) == [2, 4]
    np.testing.assert_array_equal(logged[2], first)
    np.testing.assert_array_equal(logged[4], last)

    # Without sampling: the same run replayed update by update as train() feeds it, on the step program
    # train() compiled (a second train() would compile it again: 19 s of CPU).
    plain, data = build_run(run.cfg, mesh=run.mesh), ImageData(4, 64)
    plain.compiled = run.compiled
    losses = [float(plain.step(global_batch(plain.task.host_batch(run.cfg, next(data), host_rng(run.cfg, step)),
                                            plain.mesh))["loss"]) for step in range(UPDATES)]
    assert [h["loss"] for h in run.history] == losses  # bit for bit

    # Without a previewer the collage shows the latents in false colour, and the log says so. With data that
    # names no captions, the first batch's are the prompts.
    run.task.wanted_previewer = lambda cfg: False
    with caplog.at_level(logging.WARNING, logger="cascade_jax.training.samples"):
        fallback = SampleCollage(run, tiny("c", tmp_path, "no_previewer", f"sample_every={EVERY}"), ImageData(4, 64))
    assert "false-colour" in caplog.text and fallback.decoder == "false colour (no previewer)"
    assert fallback.captions is None
    batch = next(ImageData(4, 64))
    fallback.remember(batch)
    fallback.remember(next(ImageData(4, 64, seed=1)))  # only the first batch counts
    assert fallback.captions == batch["captions"] and fallback.caption_source == "first batch"
    # sample_prompts overrides the dataset's captions.
    chosen = SampleCollage(run, tiny("c", tmp_path, "chosen", f"sample_every={EVERY}", "sample_prompts=[a cat]"),
                           CaptionedImageData(4, 64))
    assert chosen.captions == ["a cat"] and chosen.caption_source == "sample_prompts"


def test_stage_b_collage_reconstructs_the_first_batch_from_the_ema(tmp_path):
    """The hook as train() drives it (a StepInfo with the loader batch after each update: due on the first, to
    keep its images, and every EVERY updates), on a built run without training steps (the Stage B step would
    compile for another 28 s of CPU)."""
    cfg = tiny("b", tmp_path, "b", f"sample_every={EVERY}", "ema_start_iters=0", "ema_iters=1", "ema_beta=0.9")
    run = build_run(cfg, mesh=one_device())
    hook, data = SampleCollage(run, cfg), ImageData(4, 64)
    first_batch = next(ImageData(4, 64))
    for step in range(1, UPDATES + 1):
        hook(StepInfo(step, run, {}, next(data)))
    found = collages(tmp_path, "b")
    assert list(found) == ["step_00000002.png", "step_00000004.png"]
    # 64-px images -> 16x16 Stage B latents -> 64-px Stage A decodes, tiles upscaled 2x to 128; originals above
    # reconstructions: 4*128 + 5*2 = 522 wide, 2*128 + 3*2 + 14 = 276 high.
    assert {im.size for im in found.values()} == {(522, 276)}
    meta = found["step_00000004.png"].text
    assert meta["decoder"] == "stage_a" and meta["weights"] == "ema"
    assert json.loads(meta["captions"]) == first_batch["captions"]
    grid = np.asarray(found["step_00000004.png"].convert("RGB"))
    for i, image in enumerate(first_batch["images"]):
        left = PAD + i * (128 + PAD)
        np.testing.assert_array_equal(grid[PAD:PAD + 128, left:left + 128], image.repeat(2, 0).repeat(2, 1))
    # The EMA is what is sampled: other parameters change nothing, another EMA changes the reconstructions.
    rows, _ = hook.images(run.state)
    scaled = lambda tree: jax.tree.map(lambda x: x * 0.5, tree)
    np.testing.assert_array_equal(hook.images(run.state.replace(params=scaled(run.state.params)))[0][1], rows[1])
    assert not np.array_equal(hook.images(run.state.replace(ema=scaled(run.state.ema)))[0][1], rows[1])
    np.testing.assert_array_equal(collage(rows, hook.captions), grid)
    # Same weights (no update between them here) and the same noise for every collage: the same picture.
    np.testing.assert_array_equal(np.asarray(found["step_00000002.png"].convert("RGB")), grid)


def test_collage_layout_and_false_colour():
    latents = np.random.default_rng(0).standard_normal((3, 2, 5, 16)).astype(np.float32)
    rgb = false_colour(latents)
    assert rgb.shape == (3, 16, 40, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, false_colour(latents.copy()))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10  # the channels show, not one flat colour
    grid = collage([rgb, rgb], ["a", "b" * 200, "c"])
    # tiles of 16x40 upscaled 8x (to >= 128 px): 3*320 + 4*2 wide, 2*128 + 3*2 + caption strip high
    assert grid.shape == (2 * 128 + 3 * PAD + CAPTION_HEIGHT, 3 * 320 + 4 * PAD, 3)
    with pytest.raises(ValueError, match="row 1"):
        collage([rgb, rgb[:2]])
