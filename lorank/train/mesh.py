"""The device mesh, logical-axis layouts on it, and batches fed per process.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters
and optimizer state sharded), `tensor` (tensor parallel: heads, MLP and vocab
dimensions split). The batch is split over data x fsdp; how a model's logical
axes map onto the mesh is the model family's `axis_rules`
(`lorank.models.family.ModelFamily`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The logical batch axis of activations and batches; model families add their parameters' rules.
BATCH_RULE = ("batch", BATCH_AXES)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves sizes of (data, fsdp, tensor); at most one may be -1 (fill the rest).

    Raises:
      ValueError: unknown axis, bad size, or a product that does not equal the
        device count (the message names both).
    """
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are "
            "available")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: tuple = ()) -> Any:
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` boxes (plain leaves: replicated).

    `rules` map logical axis names to mesh axes (a model family's `axis_rules`; `BATCH_RULE` is
    added); a logical axis without a rule is replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, (BATCH_RULE, *rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a batch whose batch axis follows `leading_dims` unsharded axes."""
    return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def process_rows(mesh: Mesh, batch_shape: tuple[int, ...]) -> np.ndarray:
    """The rows of a global batch this process feeds, as indices into its flattened batch axes.

    A batch laid out as `batch_shape` = (*leading, batch) (e.g. (grad_accum, micro_batch)) is
    split over the mesh's data axes along its last axis; this process's devices hold one
    contiguous range [lo, hi) of it. Returns int64 [prod(leading) * (hi - lo)]: the indices
    a * batch + j (a over the leading positions, j in [lo, hi)) into the flattened
    [prod(batch_shape)] batch, in row-major order. One process: every row.
    """
    *leading, size = batch_shape
    sharding = batch_sharding(mesh, leading_dims=len(leading))
    spans = sorted({index[-1].indices(size)[:2] for index in
                    sharding.addressable_devices_indices_map(tuple(batch_shape)).values()})
    lo, hi = spans[0][0], spans[0][1]
    for start, stop in spans[1:]:
        if start > hi:
            raise ValueError(f"this process's devices hold rows {spans} of a batch of {size}, which are not "
                             "contiguous: order the mesh's devices by process")
        hi = max(hi, stop)
    local = np.arange(lo, hi)
    offsets = np.arange(math.prod(leading)) * size
    return (offsets[:, None] + local[None, :]).reshape(-1)


def global_batch(mesh: Mesh, local: Any, batch_shape: tuple[int, ...]) -> Any:
    """Global arrays of a batch from the rows this process holds (`process_rows` order).

    Args:
      mesh: the mesh whose data axes split the batch.
      local: pytree of host arrays, each [len(process_rows(mesh, batch_shape)), ...].
      batch_shape: (*leading, batch), e.g. (grad_accum, micro_batch).
    Returns:
      The pytree of jax.Arrays [*batch_shape, ...] sharded by `batch_sharding` (each host
      transfers only its own rows).
    """
    *leading, size = batch_shape
    sharding = batch_sharding(mesh, leading_dims=len(leading))

    def one(x):
        x = np.asarray(x)
        rows = x.reshape(*leading, -1, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, rows, (*batch_shape, *x.shape[1:]))

    return jax.tree.map(one, local)


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when a multi-host launch is detected.

    Either JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID are set on every host, or LORANK_DISTRIBUTED=1 asks JAX to
    auto-detect the cluster (SLURM, Open MPI, TPU pods). Returns whether
    initialization happened.
    """
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    if os.environ.get("LORANK_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False
