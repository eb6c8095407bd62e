"""Test-wide setup: 8 fake CPU devices, fast compilation and a compilation cache, set before jax is imported."""

import os
import pathlib
import shutil
import tempfile

# The tests' programs are small and compiled once or a few times, so compile time dominates the suite:
# LLVM's optimization level 0 compiles them about a third faster.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# jaxlib's CPU SVD/QR call OpenBLAS, whose threads fight XLA's for the cores (100x slower SVDs).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# JAX's persistent compilation cache in one directory per session, shared by the pytest-xdist
# workers (they inherit the environment): a resumed run and tests that train the same smoke model
# load the programs compiled before. Only programs that took half a second or more are stored;
# writing every small one costs more than it saves.
_OWN_CACHE = "LORANK_TEST_COMPILATION_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["LORANK_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="lorank-test-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["LORANK_TEST_COMPILATION_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

from lorank.data.images import data_root  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the process that made the cache
        shutil.rmtree(os.environ["LORANK_TEST_COMPILATION_CACHE"], ignore_errors=True)


@pytest.fixture
def shared_data():
    """Path to `../shared/data` (or `$LORANK_DATA`); skips the test where absent."""
    path = data_root()
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} not found; set LORANK_DATA")
    return path


def damage_checkpoint(step_dir: pathlib.Path, count: int = 256) -> pathlib.Path:
    """Flips `count` bytes in the largest data file of a checkpoint step directory (not its
    checksum manifest), as a failing disk would; returns that file."""
    from lorank.train import checkpoints

    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoints.CHECKSUM_FILE]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def damage():
    """`damage_checkpoint`: damage(step_dir) -> the damaged file."""
    return damage_checkpoint
