"""Orbax checkpoints that are verified before they are trusted.

Orbax and TensorStore store no checksum of the array data: a checkpoint whose data
files were damaged on disk restores without complaint, with garbage or NaN in the
state. lorank therefore seals every finished checkpoint with a manifest
(`CHECKSUM_FILE` inside the step directory: the SHA-256 of every file in it), and
`restore_newest_intact` trusts a checkpoint only when

1. every file of the manifest is present with its recorded digest,
2. orbax restores it without error, and
3. the restored state holds no non-finite value (a state with one is never saved,
   `assert_finite`).

A checkpoint that fails is named in a warning and skipped for the next older one;
during training it is moved to `CORRUPT_DIR` beside the checkpoints (kept for
inspection, never deleted) so that the run can save that step again. When no
checkpoint is intact, `NoIntactCheckpoint` names each one and what is wrong with it.
A checkpoint without a manifest (the process stopped between orbax's commit and the
seal) is restored on the strength of checks 2 and 3 alone, with a warning.

In a multi-process run every process verifies the same files (a shared
filesystem), so all reach the same decision; only process 0 writes manifests and
moves directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lorank.optim.labels import path_str

CHECKSUM_FILE = "lorank_checksums.json"
CORRUPT_DIR = "corrupt_checkpoints"


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of a directory failed verification."""


# orbax saves a replicated array in parallel from its replicas by cutting it into one slice per
# replica, which compiles a slicing program per array shape; for slices under a MiB that costs more
# than the parallel write saves, so smaller arrays are written whole by their first replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def open_manager(directory: str, *, keep: int | None = None) -> ocp.CheckpointManager:
    """An orbax CheckpointManager over `directory` (created if missing) keeping the newest `keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=_pytree_handler())


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Starts saving `state` (a pytree of arrays) as checkpoint `step`; `seal_finished` completes it."""
    manager.save(step, args=ocp.args.PyTreeSave(state))


def step_path(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    return pathlib.Path(str(manager.directory)) / str(step)


def _digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def seal(directory: pathlib.Path) -> None:
    """Writes the manifest of a finished checkpoint directory (atomically)."""
    digests = {str(p.relative_to(directory)): _digest(p) for p in _files(directory)}
    tmp = directory / (CHECKSUM_FILE + ".tmp")
    tmp.write_text(json.dumps(digests, indent=1, sort_keys=True))
    os.replace(tmp, directory / CHECKSUM_FILE)


def seal_finished(manager: ocp.CheckpointManager) -> None:
    """Seals every checkpoint of `manager` that has no manifest yet, after waiting for saves in
    flight (process 0 writes; every process waits)."""
    manager.wait_until_finished()
    if jax.process_index() == 0:
        for step in manager.all_steps():
            directory = step_path(manager, step)
            if directory.is_dir() and not (directory / CHECKSUM_FILE).exists():
                seal(directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lorank_seal_checkpoints")


def verify_files(directory: pathlib.Path) -> str | None:
    """None when every file of the manifest has its digest (or there is no manifest); else what
    is wrong, naming the file."""
    manifest = directory / CHECKSUM_FILE
    if not manifest.exists():
        return None
    try:
        digests = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable manifest {manifest}: {err}"
    for name, digest in digests.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {path}"
        if _digest(path) != digest:
            return f"checksum mismatch in {path}"
    return None


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of `tree` that hold a NaN or an infinity."""
    flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = np.asarray(jax.device_get(_leaves_finite([x for _, x in flat])))
    return [path_str(path) or "<root>" for (path, _), good in zip(flat, ok) if not good]


def assert_finite(tree: Any, what: str) -> None:
    """Raises FloatingPointError naming the first leaves of `tree` that are not finite."""
    bad = nonfinite_leaves(tree)
    if bad:
        raise FloatingPointError(f"{what} holds non-finite values in {', '.join(bad[:5])}"
                                 f"{' and more' if len(bad) > 5 else ''}")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, shardings: Any) -> Any:
    """Checkpoint `step` of `manager` laid out with `shardings` (no verification)."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return manager.restore(step, args=ocp.args.PyTreeRestore(target, restore_args=restore_args))


def _problem(manager, step, abstract_state, shardings) -> tuple[Any, str | None]:
    """(restored state or None, None or what is wrong with checkpoint `step`)."""
    directory = step_path(manager, step)
    problem = verify_files(directory)
    if problem is not None:
        return None, problem
    try:
        state = restore(manager, step, abstract_state, shardings)
    except Exception as err:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
        return None, f"orbax could not restore it ({type(err).__name__}: {err})"
    bad = nonfinite_leaves(state)
    if bad:
        return None, f"non-finite values in {', '.join(bad[:5])}"
    return state, None


def _quarantine(directory: pathlib.Path, corrupt_root: pathlib.Path) -> pathlib.Path:
    corrupt_root.mkdir(parents=True, exist_ok=True)
    target, n = corrupt_root / directory.name, 1
    while target.exists():
        target, n = corrupt_root / f"{directory.name}.{n}", n + 1
    shutil.move(str(directory), str(target))
    return target


def restore_newest_intact(manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any, *,
                          warn: Callable[[str], None], corrupt_root: str | None = None
                          ) -> tuple[Any, int | None]:
    """The newest checkpoint that passes verification, restored with `shardings`.

    Args:
      manager: the checkpoints.
      abstract_state, shardings: the state's ShapeDtypeStructs and NamedShardings.
      warn: receives one message per checkpoint skipped (and per one without a manifest).
      corrupt_root: where skipped checkpoints are moved (process 0; the manager is reloaded);
        None leaves them in place (read-only use, e.g. sampling).
    Returns:
      (state, step), or (None, None) when `manager` holds no checkpoint.
    Raises:
      NoIntactCheckpoint: there are checkpoints and none is intact (each is named with its fault).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    faults = []
    for step in steps:
        directory = step_path(manager, step)
        state, problem = _problem(manager, step, abstract_state, shardings)
        if problem is None:
            if not (directory / CHECKSUM_FILE).exists():
                warn(f"checkpoint {directory} has no checksum manifest; restored after checking that it is finite")
            if faults and corrupt_root is not None:
                _move_aside(manager, faults, pathlib.Path(corrupt_root), warn)
            return state, step
        faults.append((directory, problem))
        warn(f"checkpoint {directory} is corrupt ({problem}); trying an older one")
    if faults:
        listing = "; ".join(f"{d}: {p}" for d, p in faults)
        raise NoIntactCheckpoint(f"no intact checkpoint in {manager.directory}: {listing}")
    return None, None


def _move_aside(manager, faults, corrupt_root: pathlib.Path, warn) -> None:
    if jax.process_index() == 0:
        for directory, _ in faults:
            warn(f"moved corrupt checkpoint {directory} to {_quarantine(directory, corrupt_root)}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lorank_quarantine_checkpoints")
    manager.reload()
