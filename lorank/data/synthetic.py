"""Synthetic data sets of the theory experiments.

`simplex_centers` and `cluster_views`: a mixture of clusters at the vertices of a
regular simplex seen through two augmented views (the one-layer nonlinear
contrastive dynamics); `cluster_mixture` builds one from a config's numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def simplex_centers(key: jax.Array, num_clusters: int, d: int) -> jax.Array:
    """Unit centers at the vertices of a regular simplex, randomly rotated in R^d.

    mu_k . mu_j = -1 / (K - 1) for k != j, so a ReLU node aligned with one center
    is silent on every other cluster.

    Returns:
      [K, d] centers (needs K <= d + 1; we require K <= d).
    """
    if not 2 <= num_clusters <= d:
        raise ValueError(f"num_clusters={num_clusters} must be in [2, d={d}]")
    e = jnp.eye(num_clusters) - 1.0 / num_clusters
    e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, d)))
    return e @ q[:num_clusters]


def cluster_views(key: jax.Array, n: int, centers: jax.Array, *, scales: jax.Array | None = None,
                  radial: float = 0.3, noise: float = 0.02, aug: float = 0.02
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A mixture of clusters seen through two augmented views.

    Sample i picks cluster k_i uniformly; its clean point is
    xbar = s_k mu_k (1 + radial g) + noise e (g, e standard normal), and the views are
    xbar + aug e', xbar + aug e''.

    Args:
      key: PRNG key.
      n: number of samples.
      centers: [K, d] cluster centers.
      scales: [K] cluster scales s_k (default 1); unequal scales give the linear
        problem a unique top eigenvector.
      radial, noise, aug: relative radial spread, isotropic noise, augmentation noise.

    Returns:
      (x [n, d], x_prime [n, d], labels [n] int32).
    """
    k_num, d = centers.shape
    if n < 2:
        raise ValueError(f"n={n} must be >= 2")
    scales = jnp.ones(k_num) if scales is None else jnp.asarray(scales)
    if scales.shape != (k_num,):
        raise ValueError(f"scales must be [{k_num}], got {scales.shape}")
    k0, k1, k2, k3, k4 = jax.random.split(key, 5)
    labels = jax.random.randint(k0, (n,), 0, k_num)
    g = jax.random.normal(k1, (n, 1))
    xbar = (scales[labels, None] * centers[labels] * (1.0 + radial * g)
            + noise * jax.random.normal(k2, (n, d)))
    x = xbar + aug * jax.random.normal(k3, (n, d))
    x_prime = xbar + aug * jax.random.normal(k4, (n, d))
    return x, x_prime, labels.astype(jnp.int32)


def cluster_mixture(config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cluster mixture a config describes: `num_samples` pairs of views of `num_clusters` clusters
    at simplex vertices in R^`dim`, cluster scales spread linearly over `scale_range` (so the linear
    problem has one top eigenvector), with `radial`, `noise` and `aug` as in `cluster_views`; keys
    from `seed`.

    Returns:
      (x [N, dim], x_prime [N, dim], centers [num_clusters, dim]).
    """
    centers = simplex_centers(jax.random.key(config.seed), config.num_clusters, config.dim)
    scales = jnp.linspace(*config.scale_range, config.num_clusters)
    x, x_prime, _ = cluster_views(jax.random.key(config.seed + 1), config.num_samples, centers, scales=scales,
                                  radial=config.radial, noise=config.noise, aug=config.aug)
    return x, x_prime, centers
