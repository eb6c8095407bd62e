"""Test-wide setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# jaxlib's CPU SVD/QR call OpenBLAS, whose threads fight XLA's for the cores (100x slower SVDs).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_dir() -> pathlib.Path:
    """Where the shared data files are: `$LORANK_DATA` or `../shared/data`."""
    return pathlib.Path(os.environ.get("LORANK_DATA", SHARED_DATA))


@pytest.fixture
def shared_data():
    """Path to `../shared/data` (or `$LORANK_DATA`); skips the test where absent."""
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} not found; set LORANK_DATA")
    return path
