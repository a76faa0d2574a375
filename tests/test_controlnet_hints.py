"""ControlNet hint filters on a photo-like test image: shapes, value ranges, and the official code paths
(canny against torch's interpolate + OpenCV exactly as the official CannyFilter runs them; the saliency
net of the inpainting masks against a PyTorch MicroResNet with the same random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from cascade_jax.data.hints import (HINT_CHANNELS, canny_hint, detect_faces, identity_hint, inpainting_hint,
                                    random_shape_masks, saliency_mask, super_resolution_hint)
from cascade_jax.data.hints.resize import gaussian_blur, resize_bilinear, resize_nearest, scale_nearest


def photo_like(height=192, width=256, seed=0) -> np.ndarray:
    """A landscape: sky gradient, sun, mountains, a house, textured grass, slight blur (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    sky = np.linspace([90, 150, 230], [200, 220, 250], height // 2).astype(np.uint8)
    image = Image.new("RGB", (width, height), (70, 130, 60))
    image.paste(Image.fromarray(np.repeat(sky[:, None], width, axis=1)), (0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.7, 10, width * 0.7 + 36, 46), fill=(255, 230, 120))
    draw.polygon([(0, height // 2), (width * 0.3, height * 0.2), (width * 0.6, height // 2)], fill=(110, 110, 120))
    draw.rectangle((width * 0.55, height * 0.55, width * 0.8, height * 0.8), fill=(180, 60, 50))
    draw.polygon([(width * 0.52, height * 0.56), (width * 0.675, height * 0.4), (width * 0.83, height * 0.56)],
                 fill=(90, 40, 30))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2))).astype(np.int16)
    pixels[height // 2:] += rng.integers(-12, 13, pixels[height // 2:].shape, dtype=np.int16)  # grass texture
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image():
    return photo_like()[None]


def _official_canny(images_uint8):
    """The official CannyFilter, verbatim in behaviour: torch bilinear to 224, uint8 truncation, cv2, back."""
    import cv2
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255
    size = x.shape[-2:]
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear")
    edges = [cv2.Canny(x[i].mul(255).permute(1, 2, 0).numpy().astype(np.uint8), 100, 200) for i in range(len(x))]
    edges = torch.stack([torch.tensor(e).div(255).unsqueeze(0) for e in edges])
    return torch.nn.functional.interpolate(edges, size=size, mode="bilinear").permute(0, 2, 3, 1).numpy()


def test_canny_equals_opencv_through_the_official_path(image):
    ours = canny_hint(image)
    expected = _official_canny(image)
    assert ours.shape == (1, 192, 256, HINT_CHANNELS["canny"]) and ours.dtype == np.float32
    assert 0 <= ours.min() and ours.max() <= 1 and (ours > 0.5).mean() > 0.01  # edges found
    np.testing.assert_array_equal(ours, expected)  # bit-exact: same uint8 image into cv2, same resizes


@pytest.fixture
def torch_multithreaded():
    """torch's bilinear kernel rounds some pixels 1 ulp differently when it runs on a single thread (e.g. a process
    pinned to one CPU); the reference is its multi-threaded result, what it computes with two or more cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def test_resampling_matches_torch(torch_multithreaded):
    x = np.random.default_rng(0).random((2, 37, 50, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    back = lambda y: y.permute(0, 2, 3, 1).numpy()
    for size in [(224, 224), (19, 61)]:
        expected = back(torch.nn.functional.interpolate(t, size=size, mode="bilinear"))
        # Bit-exact for the canny path's 224x224; torch's vectorised kernel rounds some other
        # widths in another order (1 ulp).
        np.testing.assert_allclose(resize_bilinear(x, size), expected, rtol=0, atol=0 if size[1] == 224 else 2.5e-7)
        np.testing.assert_array_equal(resize_nearest(x, size),
                                      back(torch.nn.functional.interpolate(t, size=size, mode="nearest")))
    for factor in (0.5, 2.0):
        np.testing.assert_array_equal(scale_nearest(x, factor),
                                      back(torch.nn.functional.interpolate(t, scale_factor=factor, mode="nearest")))
    import torchvision.transforms.functional as TF
    mask = (np.random.default_rng(1).random((1, 90, 100, 1)) > 0.6).astype(np.float32)
    expected = back(TF.gaussian_blur(torch.from_numpy(mask).permute(0, 3, 1, 2), 21))
    np.testing.assert_allclose(gaussian_blur(mask, 21), expected, atol=1e-5)


def test_inpainting_hint_with_a_drawn_mask(image):
    mask = np.zeros(image.shape[1:3], bool)
    mask[40:120, 60:200] = True
    hint = inpainting_hint(image, mask)
    assert hint.shape == (1, 192, 256, HINT_CHANNELS["inpainting"]) and hint.dtype == np.float32
    assert 0 <= hint.min() and hint.max() <= 1
    np.testing.assert_array_equal(hint[0, ..., 3], mask.astype(np.float32))
    assert np.all(hint[0][mask][:, :3] == 1)  # masked pixels are white
    np.testing.assert_allclose(hint[0][~mask][:, :3], image[0][~mask] / 255, atol=1e-7)
    assert inpainting_hint(image, (mask * 255).astype(np.uint8)[..., None]).tobytes() == hint.tobytes()


def test_automatic_masks(image):
    with pytest.raises(RuntimeError, match="saliency_model.pt"):
        saliency_mask(image, None)
    # A stand-in saliency net: brightness. Outpainting inverts the mask.
    saliency = lambda x: x.mean(-1, keepdims=True)
    inside = saliency_mask(image, saliency, threshold=0.5, outpaint=False, rng=np.random.default_rng(0))
    outside = saliency_mask(image, saliency, threshold=0.5, outpaint=True, rng=np.random.default_rng(0))
    assert inside.shape == outside.shape == (1, 192, 256, 1) and inside.dtype == bool
    assert 0.05 < inside.mean() < 0.95 and np.mean(inside == outside) < 0.2
    masks = random_shape_masks(np.random.default_rng(0), 8, 96, 128, kernel=21)
    assert masks.shape == (8, 96, 128, 1) and masks.dtype == bool
    coverage = masks.mean(axis=(1, 2, 3))
    assert np.all(coverage < 1) and np.all(coverage > 0) and len(set(np.round(coverage, 3))) > 4


def test_super_resolution_hint(image):
    calls = []

    def encode(pixels):  # stands in for the EfficientNet encoder: 32x down, 16 channels
        calls.append(pixels)
        b, h, w, _ = pixels.shape
        return np.ones((b, -(-h // 32), -(-w // 32), 16), np.float32) * pixels.mean()

    hint, preview = super_resolution_hint(image, encode)  # training: the image is downscaled first
    assert calls[0].shape == (1, 96, 128, 3) and abs(calls[0].mean()) < 3  # ImageNet-normalised
    assert hint.shape == (1, 6, 8, HINT_CHANNELS["super_resolution"]) and preview.shape == (1, 192, 256, 3)
    hint, preview = super_resolution_hint(image, encode, downscale=False)  # inference: output 2x the input
    assert calls[1].shape == (1, 192, 256, 3) and hint.shape == (1, 12, 16, 16) and preview.shape == (1, 384, 512, 3)


def test_identity_hint_paints_embeddings_into_boxes(image):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((2, 512)).astype(np.float32)
    boxes = np.array([[10, 20, 70, 90], [150, 40, 250, 180]], np.float32)
    hint, preview = identity_hint(image, [boxes], [embeddings])
    assert hint.shape == (1, 6, 8, HINT_CHANNELS["identity"]) and preview.shape == image.shape
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(hint[0, 1, 0], unit[0], rtol=1e-6)  # box 0 → cells x 0..2, y 1..3 (rounded)
    np.testing.assert_allclose(hint[0, 4, 7], unit[1], rtol=1e-6)
    assert np.all(hint[0, 0] == 0) and np.all(hint[0, 5, :5] == 0)
    assert 0 <= preview.min() and preview.max() <= 1 and not np.allclose(preview, image / 255)
    # Training: a lone face fills the whole map with p_full, disappears with p_drop.
    full, _ = identity_hint(image, [boxes[:1]], [embeddings[:1]], rng=np.random.default_rng(0), p_full=1.0)
    assert np.all(full == unit[0])
    dropped, _ = identity_hint(image, [boxes], [embeddings], rng=np.random.default_rng(0), p_drop=1.0)
    assert np.all(dropped == 0)
    many, _ = identity_hint(image, [np.tile(boxes, (3, 1))], [np.tile(embeddings, (3, 1))])  # at most 4 faces
    assert np.any(many != 0)
    with pytest.raises(RuntimeError, match="buffalo_l"):
        detect_faces(image)


def _torch_micro_resnet():
    """The official MicroResNet's layer sequence in PyTorch (same module names), for the parity check."""
    nn = torch.nn

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.resblock = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True),
                                          nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                          nn.InstanceNorm2d(c, affine=True))

        def forward(self, x):
            return self.resblock(x) + x

    class Up(nn.Module):
        def forward(self, x):
            return nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    def down(ci, co, k, s, p):
        return [nn.ReflectionPad2d(p), nn.Conv2d(ci, co, k, stride=s), nn.InstanceNorm2d(co, affine=True), nn.ReLU()]

    class MicroResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.downsampler = nn.Sequential(*down(3, 8, 9, 4, 4), *down(8, 16, 3, 2, 1), *down(16, 32, 3, 2, 1))
            self.residual = nn.Sequential(Res(32), nn.Conv2d(32, 64, 1, bias=False, groups=32), Res(64))
            self.segmentator = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(64, 16, 3),
                                             nn.InstanceNorm2d(16, affine=True), nn.ReLU(), Up(),
                                             nn.ReflectionPad2d(4), nn.Conv2d(16, 1, 9), nn.Sigmoid())

        def forward(self, x):
            return self.segmentator(self.residual(self.downsampler(x)))

    return MicroResNet()


def test_saliency_net_matches_torch_and_makes_masks(image):
    from flax import nnx

    from cascade_jax.models.saliency import MicroResNet
    from cascade_jax.weights.tree import load_torch_state_dict
    from helpers import randomize_torch_module, relative_error

    reference = randomize_torch_module(_torch_micro_resnet(), seed=0)
    model = nnx.eval_shape(lambda: MicroResNet(rngs=nnx.Rngs(0)))
    load_torch_state_dict(model, reference.state_dict())
    x = (image[:, :, :240] / 255).astype(np.float32)  # 192x240: the filter's short side is 240 at 240x300
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
    assert ours.shape == expected.shape == (1, 24, 30, 1)
    err = relative_error(ours, expected)
    print(f"saliency MicroResNet vs torch: rel err {err:.2e}")
    assert err <= 1e-4
    forward = nnx.jit(lambda m, v: m(v))
    mask = saliency_mask(image, lambda v: np.asarray(forward(model, v)), threshold=float(np.median(expected)),
                         outpaint=False)
    assert mask.shape == (1, 192, 256, 1) and mask.dtype == bool
