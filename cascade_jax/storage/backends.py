"""The filesystem of a URL, configured once from the standard environment for every library.

Credentials come from each cloud's standard chain (application default credentials for GCS, the
AWS environment/profile chain for S3) and are never read, printed or stored here. Endpoints come
only from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) and ``STORAGE_EMULATOR_HOST``; they are
mapped to what each library reads: fsspec's defaults (so s3fs/gcsfs instances that Orbax, etils and
TFDS create see them too) and TensorStore's ``TENSORSTORE_GCS_HTTP_URL``. An emulator takes no
credentials, as Google's client libraries assume: gcsfs and TensorStore talk to it anonymously.
"""

from __future__ import annotations

import os
import threading

from cascade_jax.storage.urls import is_url, scheme

CLOUD_EXTRA = "pip install 'cascade-jax[cloud]'"
# Protocol -> the package that implements it (for the message when it is missing).
PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs"}
_lock = threading.Lock()
_configured: tuple | None = None


def require_fsspec():
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"paths that are URLs need fsspec and the cloud filesystems: {CLOUD_EXTRA}") from None
    return fsspec


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def gcs_emulator() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure() -> None:
    """Map the endpoint variables onto fsspec's defaults and TensorStore's variables (idempotent;
    again whenever the variables change)."""
    global _configured
    state = (s3_endpoint(), gcs_emulator())
    if state == _configured:
        return
    with _lock:
        fsspec = require_fsspec()
        s3, emulator = state
        # botocore would retry inside a call where nobody counts: s3fs and faults.retrying do, counted.
        # No listings cache: objects appear by other writers (TensorStore, other hosts, a killed trainer), and
        # a cached listing of a step folder would hide its commit file from Orbax (a resume found no step).
        s3_options = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}},
                      "use_listings_cache": False}
        if s3:
            s3_options["client_kwargs"] = {"endpoint_url": s3}
        fsspec.config.conf["s3"] = {**fsspec.config.conf.get("s3", {}), **s3_options}
        if emulator:
            fsspec.config.conf["gs"] = {**fsspec.config.conf.get("gs", {}), "token": "anon"}
            fsspec.config.conf["gcs"] = fsspec.config.conf["gs"]
            # gcsfs asks a gRPC control plane for each bucket's layout; an HTTP emulator has none and
            # every call would wait for its timeout. Read when gcsfs is imported.
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator
            if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
                # TensorStore has no anonymous mode: a fixed token keeps it from looking for the GCE
                # metadata server (the emulator ignores the token).
                os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        elif "TENSORSTORE_GCS_HTTP_URL" in os.environ and _configured and _configured[1]:
            del os.environ["TENSORSTORE_GCS_HTTP_URL"]  # the emulator is gone: the real endpoint again
        _configured = state


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; a missing package names the ``cloud`` extra."""
    if not is_url(url):
        raise ValueError(f"{url!r} is a local path, not a URL")
    configure()
    fsspec = require_fsspec()
    protocol = scheme(url)
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as err:
        package = PACKAGES.get(protocol, getattr(err, "name", None) or "its fsspec implementation")
        raise ImportError(f"{url}: {protocol}:// paths need {package}: {CLOUD_EXTRA}") from None
    except ValueError as err:
        if "Protocol not known" in str(err) or "protocol" in str(err).lower():
            raise ValueError(f"{url}: no filesystem is known for {protocol}:// (fsspec: {err}); use gs://, s3:// "
                             f"or another fsspec protocol") from None
        raise
