"""Reading GaLore's state out of any optimizer state: the ScaleByGaloreStates, and scalars to log."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorank.optim.galore import ProjectorState, ScaleByGaloreState

def find_galore_states(opt_state: Any) -> list[ScaleByGaloreState]:
    """Every ScaleByGaloreState inside an (arbitrarily nested) optimizer state."""
    found = []
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByGaloreState)):
        if isinstance(node, ScaleByGaloreState):
            found.append(node)
    return found


def galore_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """Scalars to log: SVD refreshes accepted, refreshes refused as non-finite, step of the last refusal.

    Returns {} when the state holds no GaLore transformation.
    """
    states = find_galore_states(opt_state)
    if not states:
        return {}
    is_proj = lambda x: isinstance(x, ProjectorState)  # noqa: E731
    refreshes = [p.refreshes for s in states
                 for p in jax.tree.leaves(s.projectors, is_leaf=is_proj) if is_proj(p)]
    return {
        "galore/refreshes": sum(refreshes) if refreshes else jnp.zeros([], jnp.int32),
        "galore/nonfinite_refreshes": sum(s.nonfinite for s in states),
        "galore/last_nonfinite_step": jnp.max(jnp.stack([s.last_nonfinite for s in states])),
    }
