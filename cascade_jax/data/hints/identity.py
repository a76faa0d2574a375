"""Face-identity hints (official ``IdentityFilter``): ArcFace embeddings painted into face boxes.

Each detected face's 512-d ArcFace embedding (L2-normalised) fills its bounding box on a map at
1/32 of the image resolution (the Stage C latent grid of a training image), at most 4 faces; in
training a face is dropped with p 0.05, and a lone face fills the whole map with p 0.3
(inference: neither). The result is a (B, H/32, W/32, 512) hint for the ``simple`` bottleneck.

Detection and recognition are not included: the official filter runs InsightFace's ``buffalo_l``
ONNX models (``det_10g.onnx`` detector, ``w600k_r50.onnx`` ArcFace) through onnxruntime. Run
those (or any detector + ArcFace) yourself and pass boxes (x0, y0, x1, y1 in pixels) and embeddings.
"""

from __future__ import annotations

import numpy as np

from cascade_jax.data.hints.images import as_float_images

IDENTITY_CHANNELS = 512
MAX_FACES = 4
CELL = 32  # pixels per hint cell
# Colours of the preview boxes, in the official order.
ID_COLORS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [0.5, 0, 0], [0, 0.5, 0],
                      [0, 0, 0.5], [0.5, 0, 0.5], [0, 0.5, 0.5], [0.5, 0.5, 0]], np.float32)

FACE_MODELS_MISSING = (
    "face detection and ArcFace embeddings are not part of cascade-jax: the official identity filter uses "
    "InsightFace's buffalo_l models (det_10g.onnx, w600k_r50.onnx) with onnxruntime. Compute them yourself and "
    "pass boxes (N, 4: x0, y0, x1, y1 pixels) and embeddings (N, 512) per image (--faces FILE.npz with arrays "
    "'boxes' and 'embeddings').")


def _cells(box, height: int, width: int):
    """The official box → cell rule: box/32 clamped at 0, rounded (half to even, as torch), at least one cell."""
    sx, sy, ex, ey = (int(v) for v in np.round(np.maximum(np.asarray(box, np.float32)[:4] / CELL, 0)))
    return sx, sy, max(ex, sx + 1), max(ey, sy + 1)


def identity_hint(images, boxes, embeddings, *, rng: np.random.Generator | None = None, max_faces: int = MAX_FACES,
                  p_drop: float = 0.0, p_full: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(hint (B, H/32, W/32, 512), preview (B, H, W, 3))`` from per-image ``boxes`` / ``embeddings`` lists.

    Defaults are the official inference settings (no drop, no full map); training uses
    ``p_drop=0.05, p_full=0.3`` with an ``rng``.
    """
    x = as_float_images(images)
    batch, height, width = x.shape[:3]
    if len(boxes) != batch or len(embeddings) != batch:
        raise ValueError(f"identity_hint: {len(boxes)} box lists and {len(embeddings)} embedding lists "
                         f"for {batch} images; give one (possibly empty) list per image")
    rng = np.random.default_rng() if rng is None else rng
    hint = np.zeros((batch, height // CELL, width // CELL, IDENTITY_CHANNELS), np.float32)
    preview = x[..., :3].copy()
    for i in range(batch):
        ids = np.asarray(embeddings[i], np.float32).reshape(-1, IDENTITY_CHANNELS)[:max_faces]
        faces = np.asarray(boxes[i], np.float32).reshape(-1, 4)[:max_faces]
        if len(ids) != len(faces):
            raise ValueError(f"image {i}: {len(faces)} boxes but {len(ids)} embeddings")
        ids = ids / np.maximum(np.linalg.norm(ids, axis=1, keepdims=True), 1e-12)
        for j in range(len(faces)):
            if rng.random() <= p_drop:
                continue
            sx, sy, ex, ey = _cells(faces[j], height, width)
            if len(faces) == 1 and rng.random() < p_full:
                sx, sy, ex, ey = 0, 0, width // CELL, height // CELL
            hint[i, sy:ey, sx:ex] = ids[j]
            region = preview[i, sy * CELL:ey * CELL, sx * CELL:ex * CELL]
            region[...] = (region + ID_COLORS[j % len(ID_COLORS)]) * 0.5
    return hint, preview


def detect_faces(images):
    """Placeholder for the official detector + ArcFace: always explains what is missing."""
    raise RuntimeError(FACE_MODELS_MISSING)
