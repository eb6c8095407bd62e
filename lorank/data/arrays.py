"""Batches of in-memory arrays as a pure function of the training step.

`epoch_batches({"images": x, "labels": y}, batch_size, seed=0)` gives what
`lorank.train.loop.Task.train_batch` needs: step s's global batch is the next
`batch_size` rows of a permutation drawn from (seed, epoch), so a resumed run sees
the batches an uninterrupted one would, and each process can ask for its own rows.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lorank import checks


def epoch_batches(arrays: dict[str, np.ndarray], batch_size: int, *, seed: int = 0
                  ) -> Callable[[int, np.ndarray | None], dict[str, np.ndarray]]:
    """(step, rows=None) -> {name: array[picks]} with picks [R] row indices, a pure function of the step.

    Epoch e = step // (M // batch_size) visits the M rows in the order of a permutation drawn
    from (seed, e); the M % batch_size rows left over differ from epoch to epoch. `rows` (int
    indices into the global batch) selects the rows a host feeds; None gives all, R = batch_size.

    Raises:
      ValueError: arrays of different lengths, fewer rows than batch_size, a negative step, rows
        outside [0, batch_size).
    """
    if not arrays:
        raise ValueError("epoch_batches needs at least one array")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays of different lengths: {lengths}")
    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    seed = checks.integer("seed", seed, minimum=0)
    count = next(iter(lengths.values()))
    if count < batch_size:
        raise ValueError(f"{count} rows are fewer than batch_size={batch_size}")
    per_epoch = count // batch_size

    def batch(step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        step = checks.integer("step", step, minimum=0)
        epoch, index = divmod(step, per_epoch)
        picks = np.random.default_rng([seed, epoch]).permutation(count)[index * batch_size:(index + 1) * batch_size]
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= batch_size):
                raise ValueError(f"rows must lie in [0, {batch_size}), got {rows.tolist()}")
            picks = picks[rows]
        return {k: v[picks] for k, v in arrays.items()}

    return batch
