"""Uploads checked from their header, before gradio decodes them (gradio would decode an image of any
size, and its errors for a file that is not an image show the server's cache path)."""

from __future__ import annotations

from pathlib import Path

from cascade_jax.pipelines.images import open_checked


def upload_sources(payload) -> list[tuple[str, object]]:
    """(name shown to the user, path or bytes) of each image in an upload: gradio's image data (a file with
    ``path`` and ``orig_name``) or its image editor's (``background``, ``layers``, ``composite``)."""
    if payload is None:
        return []
    parts = [payload.background, payload.composite, *(payload.layers or [])] if hasattr(payload, "background") \
        else [payload]
    sources = []
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            sources.append(("the drawn image", part))
        elif part is not None and getattr(part, "path", None):
            sources.append((getattr(part, "orig_name", None) or "the image", part.path))
    return sources


def check_upload(payload, max_pixels: int, ttl_min: float | None = None):
    """Refuse an upload that is not an image, or has more than ``max_pixels``, from its header alone (before
    gradio decodes it), with a message that names the user's file, never the server's cache path."""
    for name, source in upload_sources(payload):
        if not isinstance(source, (bytes, bytearray, memoryview)) and not Path(source).is_file():
            kept = f" (uploads are deleted after {ttl_min:g} minutes)" if ttl_min else ""
            raise ValueError(f"the uploaded image {name} is no longer on this server{kept}: upload it again")
        with open_checked(source, f"the uploaded file {name}", max_pixels):
            pass
