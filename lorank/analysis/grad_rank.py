"""Stable rank of gradients, grouped by the kind of layer they belong to.

GaLore's premise is that weight gradients of transformers are low rank, and
more so for some layer types than others. `group_stable_ranks` measures the
mean stable rank ||G||_F^2 / ||G||_2^2 of every 2-D gradient in each group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lorank.analysis import spectrum


def group_stable_ranks(grads: Any, group_of: Callable[[tuple], str | None]) -> dict[str, jax.Array]:
    """Mean stable rank of the 2-D leaves of `grads` per group.

    Args:
      grads: pytree of gradients; leaves that are not matrices are skipped.
      group_of: tree path -> group name, or None to skip the leaf (a model family's
        `layer_kind`, e.g. `lorank.models.llama.layer_kind`).
    Returns:
      {group: [] mean stable rank over the group's matrices} for non-empty groups.
    """
    ranks: dict[str, list[jax.Array]] = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        group = group_of(tuple(path))
        if group is None or g.ndim != 2:
            continue
        ranks.setdefault(group, []).append(spectrum.stable_rank(g.astype(jnp.float32)))
    return {group: jnp.mean(jnp.stack(values)) for group, values in ranks.items()}
