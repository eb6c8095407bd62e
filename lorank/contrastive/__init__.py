"""Contrastive learning as pure functions: distances, contrastive covariance and energy, the
L_{phi,psi} family, alpha-CL pair weights, DirectCLR.

`contrastive_loss(name, z1, z2, **hyper)` is every loss by name: the family (`family.FAMILY_NAMES`)
or alpha-CL (`alpha.ALPHA_LOSS_NAMES`: "quadratic", "backprop", "r_H", "r_gamma", "r_s", "direct",
"uniform"); `check_loss` checks a name and its hyperparameters without compute.
"""

from typing import Any

import jax

from lorank.contrastive import hyper as _hyper
from lorank.contrastive.alpha import ALPHA_LOSS_NAMES, WEIGHT_NAMES, alpha_cl_loss, pair_weights
from lorank.contrastive.directclr import directclr_loss
from lorank.contrastive.energy import (
    NEGATIVES,
    contrastive_cov,
    energy,
    negative_mask,
    positive_sq_dists,
    sq_dists,
    stack_views,
    two_view_energy,
    two_view_sq_dists,
    uniform_alpha,
)
from lorank.contrastive.family import FAMILY_NAMES, family_loss, min_player_weights, phi_psi

LOSS_NAMES = FAMILY_NAMES + tuple(n for n in ALPHA_LOSS_NAMES if n != "uniform")


def check_loss(name: str, **hyper: Any) -> str:
    """`name` if it is a loss of LOSS_NAMES (or "uniform") and `hyper` are valid for it; else ValueError."""
    if name in FAMILY_NAMES:
        _hyper.resolve(name, hyper)
    elif name in ALPHA_LOSS_NAMES:
        _hyper.resolve(name, hyper, alpha=True)
    else:
        raise ValueError(f"unknown contrastive loss {name!r}; expected one of {LOSS_NAMES}")
    return name


def contrastive_loss(name: str, z1: jax.Array, z2: jax.Array, **hyper: Any) -> jax.Array:
    """The loss `name` of two views z1, z2 [N, D] -> []: `family_loss` or `alpha_cl_loss`."""
    check_loss(name, **hyper)
    if name in FAMILY_NAMES:
        return family_loss(name, z1, z2, **hyper)
    return alpha_cl_loss(name, z1, z2, **hyper)


__all__ = [
    "ALPHA_LOSS_NAMES", "FAMILY_NAMES", "LOSS_NAMES", "NEGATIVES", "WEIGHT_NAMES", "alpha_cl_loss", "check_loss",
    "contrastive_cov", "contrastive_loss", "directclr_loss", "energy", "family_loss", "min_player_weights",
    "negative_mask", "pair_weights", "phi_psi", "positive_sq_dists", "sq_dists", "stack_views", "two_view_energy",
    "two_view_sq_dists", "uniform_alpha",
]
