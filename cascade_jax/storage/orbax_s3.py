"""s3:// checkpoints for Orbax, through TensorStore's s3 driver, with the commit protocol Orbax uses for gs://.

Orbax 0.12 builds a TensorStore kvstore natively for gs:// and local paths only: given ``s3://b/x`` it
folds the URL into a relative file path and refuses it ("Checkpoint path should be absolute"). And it
finalises a step on anything but GCS by renaming its temporary folder, which an object store does as
copy-then-delete: a process killed midway would leave a step that looks complete.

:func:`install` teaches Orbax ``s3://`` the way it does ``gs://``: arrays through TensorStore's ``s3``
kvstore (endpoint from ``AWS_ENDPOINT_URL``, region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
credentials from the AWS chain as TensorStore reads it), and a step complete only once its
``commit_success.txt`` is written (``CommitFileTemporaryPath``). Folder operations (listing steps,
deleting old ones) go through etils' fsspec backend, i.e. s3fs with the endpoint ``backends`` set.
It wraps five module-level functions of Orbax, changing them for ``s3://`` paths only; an Orbax
without one of them makes :func:`install` return False, and ``s3://`` checkpoints are refused as before.
"""

from __future__ import annotations

import os

from cascade_jax.storage import backends

_installed: bool | None = None


def _is_s3(path) -> bool:
    return str(path).startswith("s3://")


def kvstore_spec(url: str) -> dict:
    """TensorStore's ``s3`` kvstore spec of ``s3://bucket/key`` (the endpoint and region from the environment)."""
    bucket, _, key = str(url).removeprefix("s3://").partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    if backends.s3_endpoint():
        spec["endpoint"] = backends.s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def install() -> bool:
    """Make Orbax read and write ``s3://`` checkpoints (once per process); False if this Orbax cannot be taught."""
    global _installed
    if _installed is None:
        try:
            from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
            from orbax.checkpoint._src.serialization import tensorstore_utils

            _wrap(tensorstore_utils, atomicity_defaults, gcs_utils, atomicity.CommitFileTemporaryPath)
            _installed = True
        except (ImportError, AttributeError):  # another Orbax layout: s3:// stays refused, with the reason
            _installed = False
    return _installed


def _wrap(tensorstore_utils, atomicity_defaults, gcs_utils, commit_file) -> None:
    use_gcs_driver, normalize = tensorstore_utils._use_gcs_driver, tensorstore_utils._normalize_path
    gcs_kvstore = gcs_utils.get_kvstore_for_gcs
    default_class = atomicity_defaults.get_default_temporary_path_class
    item_class = atomicity_defaults.get_item_default_temporary_path_class

    def normalize_path(path: str) -> str:
        text = normalize(path)  # os.path.normpath folds s3://b into s3:/b
        return "s3://" + text.removeprefix("s3:/").lstrip("/") if text.startswith("s3:/") else text

    # "gcs driver" in Orbax means "a remote kvstore built from the URL", which get_kvstore_for_gcs builds.
    tensorstore_utils._use_gcs_driver = lambda directory: _is_s3(directory) or use_gcs_driver(directory)
    tensorstore_utils._normalize_path = normalize_path
    gcs_utils.get_kvstore_for_gcs = lambda path: kvstore_spec(path) if _is_s3(path) else gcs_kvstore(path)
    atomicity_defaults.get_default_temporary_path_class = \
        lambda path, **kw: commit_file if _is_s3(path) else default_class(path, **kw)
    atomicity_defaults.get_item_default_temporary_path_class = \
        lambda path, **kw: commit_file if _is_s3(path) else item_class(path, **kw)
