"""Spectra of matrices: singular values, stable rank and effective rank.

All functions take [..., m, n] and work on the trailing two axes, so a stack of
gradients or a trajectory of weights is measured in one call. They are jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def singular_values(m: jax.Array) -> jax.Array:
    """Singular values in decreasing order.

    Args:
      m: [..., rows, cols].

    Returns:
      [..., min(rows, cols)].
    """
    _check_matrix(m)
    return jnp.linalg.svd(m, compute_uv=False)


def stable_rank(m: jax.Array) -> jax.Array:
    """Stable rank ||M||_F^2 / ||M||_2^2, in [1, rank(M)] (0 for a zero matrix).

    Args:
      m: [..., rows, cols].

    Returns:
      [...] stable ranks.
    """
    s = singular_values(m)
    top = s[..., 0] ** 2
    fro = jnp.sum(s**2, axis=-1)
    return jnp.where(top > 0, fro / jnp.where(top > 0, top, 1.0), 0.0)


def effective_rank(m: jax.Array) -> jax.Array:
    """Effective rank exp(H(p)), p = sigma / sum(sigma) (Roy & Vetterli, 2007).

    In [1, rank(M)] for a non-zero matrix (0 for a zero matrix); equals k for k
    equal non-zero singular values.

    Args:
      m: [..., rows, cols].

    Returns:
      [...] effective ranks.
    """
    s = singular_values(m)
    total = jnp.sum(s, axis=-1, keepdims=True)
    p = s / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.where(total[..., 0] > 0, jnp.exp(entropy), 0.0)


def _check_matrix(m: jax.Array) -> None:
    if jnp.ndim(m) < 2:
        raise ValueError(f"expected a matrix [..., rows, cols], got shape {jnp.shape(m)}")
