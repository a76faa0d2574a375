import os
from pathlib import Path

import pytest

# Keep the CPU suite deterministic and able to test sharding on 8 virtual devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU backend also where libtpu (the `tpu` extra, for --plan) is installed: JAX would
# otherwise try to start a TPU backend. Planning for a TPU slice opens its topology explicitly
# (cascade_jax.accelerators), which this does not affect; scripts run by tests inherit the variable.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Scripts run by tests (generate.py, the app) compile afresh rather than share ~/.cache/cascade_jax/xla.
os.environ.setdefault("CASCADE_JAX_COMPILATION_CACHE", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the official fixtures and checkpoint layouts live there")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return shared_dir / "fixtures" / "official"


@pytest.fixture(scope="session")
def object_stores():
    """moto's S3 server and gcp-storage-emulator on free loopback ports, for the whole session
    (tests/storage_testing.py); the endpoint variables point this process and its children at them."""
    from storage_testing import start_object_stores

    stores, stop = start_object_stores()
    yield stores
    stop()
