"""Test-wide setup: 8 fake CPU devices and fast compilation, set before jax is imported anywhere."""

import os

# The tests' programs are small and compiled once or a few times, so compile time dominates the suite:
# LLVM's optimization level 0 compiles them about a third faster.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# jaxlib's CPU SVD/QR call OpenBLAS, whose threads fight XLA's for the cores (100x slower SVDs).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from lorank.data.images import data_root  # noqa: E402


@pytest.fixture
def shared_data():
    """Path to `../shared/data` (or `$LORANK_DATA`); skips the test where absent."""
    path = data_root()
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} not found; set LORANK_DATA")
    return path
