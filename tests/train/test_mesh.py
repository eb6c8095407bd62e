"""Mesh construction and the logical-axis rules."""

import jax
import pytest

from lorank.train import mesh as mesh_lib


def test_minus_one_fills_the_remaining_devices():
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert mesh_lib.mesh_shape({"tensor": -1}, 8) == (1, 1, 8)


def test_mesh_that_does_not_divide_the_devices_names_both():
    with pytest.raises(ValueError, match=r"needs 6 devices but 8 are available"):
        mesh_lib.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match=r"'fsdp': 3.*8 available devices"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": 3}, 8)


def test_bad_axes_are_rejected():
    with pytest.raises(ValueError, match="pipeline"):
        mesh_lib.mesh_shape({"pipeline": 2}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_make_mesh_uses_the_fake_devices():
    assert jax.device_count() == 8
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh_lib.data_parallel_size(mesh) == 4
