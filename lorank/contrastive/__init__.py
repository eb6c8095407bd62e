"""Contrastive learning as pure functions: distances, contrastive covariance, energies."""

from lorank.contrastive.energy import (
    contrastive_cov,
    energy,
    positive_sq_dists,
    sq_dists,
    uniform_alpha,
)

__all__ = ["contrastive_cov", "energy", "positive_sq_dists", "sq_dists", "uniform_alpha"]
