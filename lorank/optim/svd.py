"""Top singular vectors of a gradient matrix for GaLore's projectors, with a fixed sign convention.

- Signs: each vector is flipped so that its entry of largest magnitude is
  positive (first such entry on ties), so results do not depend on the LAPACK
  behind `jnp.linalg.svd` (`canonical_signs`). `align_signs` instead flips each
  new vector to a non-negative dot product with the previous projector's vector
  of the same index.
- "exact": `jnp.linalg.svd` of the [m, n] matrix. "randomized": a randomized
  range finder (Halko, Martinsson, Tropp 2011) with QR-stabilised power
  iterations and `oversample` extra columns, then the exact SVD of a small
  [k, n] matrix.

Inputs are float32 [m, n]; outputs are U_r [m, r] (orthonormal columns) and
Vh_r [r, n] (orthonormal rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SVD_METHODS = ("exact", "randomized")
DEFAULT_OVERSAMPLE = 8  # randomized SVD: extra random columns beyond the rank
DEFAULT_POWER_ITERS = 2  # randomized SVD: power iterations


def canonical_signs(vectors: jax.Array, axis: int) -> jax.Array:
    """Flip each vector so its largest-magnitude entry is positive.

    Args:
      vectors: [k, r] with vectors as columns (axis=0), or [r, k] as rows (axis=1).
      axis: the axis running along each vector.
    Returns:
      same shape and dtype; the first entry of largest |value| of each vector is >= 0.
    """
    idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
    pivot = jnp.take_along_axis(vectors, idx, axis=axis)
    return vectors * jnp.where(pivot < 0, -1, 1).astype(vectors.dtype)


def align_signs(new: jax.Array, old: jax.Array, axis: int) -> jax.Array:
    """Flip vectors of `new` whose dot product with the same vector of `old` is negative.

    Args:
      new, old: [k, r] (vectors as columns, axis=0) or [r, k] (as rows, axis=1).
    Returns:
      `new` with some vectors negated, same shape and dtype.
    """
    dots = jnp.sum(new * old.astype(new.dtype), axis=axis, keepdims=True)
    return new * jnp.where(dots < 0, -1, 1).astype(new.dtype)


def exact_top_singular(g: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-`rank` singular vectors by a full SVD, signs canonical.

    Args:
      g: [m, n] float32.
    Returns:
      (U_r [m, r], Vh_r [r, n]).
    """
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    return canonical_signs(u[:, :rank], axis=0), canonical_signs(vh[:rank], axis=1)


def randomized_top_singular(g: jax.Array, rank: int, key: jax.Array, *, oversample: int = DEFAULT_OVERSAMPLE,
                            power_iters: int = DEFAULT_POWER_ITERS) -> tuple[jax.Array, jax.Array]:
    """Approximate top-`rank` singular vectors by a randomized range finder, signs canonical.

    Y = G Omega with Omega Gaussian [n, rank + oversample], then `power_iters`
    rounds of Y <- G (G^T Y) with QR re-orthonormalisation, Q = qr(Y), and the
    exact SVD of the small B = Q^T G. Cost (2 power_iters + 2) m n k flops for
    k = rank + oversample, against O(m n min(m, n)) for the full SVD.

    Args:
      g: [m, n] float32.
      key: PRNG key for Omega.
    Returns:
      (U_r [m, r], Vh_r [r, n]), orthonormal columns / rows.
    """
    m, n = g.shape
    k = min(rank + oversample, m, n)
    omega = jax.random.normal(key, (n, k), g.dtype)
    y = g @ omega
    for _ in range(power_iters):
        y, _ = jnp.linalg.qr(y)
        z, _ = jnp.linalg.qr(g.T @ y)
        y = g @ z
    basis, _ = jnp.linalg.qr(y)  # [m, k]
    ub, _, vh = jnp.linalg.svd(basis.T @ g, full_matrices=False)  # [k, k], [k, n]
    u = basis @ ub[:, :rank]
    return canonical_signs(u, axis=0), canonical_signs(vh[:rank], axis=1)
