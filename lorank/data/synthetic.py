"""Synthetic data sets of the theory experiments.

`SeqWorld`, `seq_world` and `sample_sequences`: the sequence classes of Scan&Snap (a query, a
next token, contextual tokens common to several classes or distinct to one).
`simplex_centers` and `cluster_views`: a mixture of clusters at the vertices of a
regular simplex seen through two augmented views (the one-layer nonlinear
contrastive dynamics); `cluster_mixture` builds one from a config's numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks


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


class SeqWorld(NamedTuple):
    """The sequence classes of Scan&Snap (Tian et al., 2023): one class per next token n in [K].

    A sequence of class n holds T - 1 contextual tokens drawn i.i.d. from P(l | n) followed by
    its query m = psi(n) (the last token); its next token is `next_token[n]`. All ids live in one
    vocabulary of M tokens.

    probs: [K, M] float64 P(l | n): zero outside the class's contextual tokens, rows sum to one.
    query: [K] int, psi(n), the query (last token) of each class.
    next_token: [K] int, the token each class predicts.
    common: [C] int, contextual tokens shared by every class.
    query_common: [Q, Cq] int, contextual tokens shared by the classes of one query (row = query).
    distinct: [K, D] int, each class's own contextual tokens (ordered by increasing probability).
    seq_len: T, tokens per sequence including the query.
    """

    probs: np.ndarray
    query: np.ndarray
    next_token: np.ndarray
    common: np.ndarray
    query_common: np.ndarray
    distinct: np.ndarray
    seq_len: int

    @property
    def num_tokens(self) -> int:
        """M, the vocabulary size."""
        return self.probs.shape[1]

    @property
    def num_classes(self) -> int:
        """K, the number of next tokens (sequence classes)."""
        return self.probs.shape[0]

    @property
    def queries(self) -> np.ndarray:
        """[Q] the distinct query ids, in order of first use."""
        return np.unique(self.query)


def check_seq_world(world: SeqWorld) -> SeqWorld:
    """Validates a world's arrays; returns it.

    Raises:
      ValueError: K >= M, T < 2, a row of P(l | n) that is negative or does not sum to one,
        contextual mass on a query or next-token id, or ids outside [0, M).
    """
    probs = np.asarray(world.probs, np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [K, M], got shape {probs.shape}")
    k, m = probs.shape
    if not k < m:
        raise ValueError(f"K={k} next tokens must be fewer than M={m} tokens")
    checks.integer("seq_len", world.seq_len, minimum=2)
    if np.any(probs < 0) or not np.allclose(probs.sum(1), 1.0, atol=1e-9):
        raise ValueError(f"each row of probs must be a probability vector; row sums {probs.sum(1)}")
    for name in ("query", "next_token"):
        ids = np.asarray(getattr(world, name))
        if ids.shape != (k,) or np.any(ids < 0) or np.any(ids >= m):
            raise ValueError(f"{name} must be [{k}] ids in [0, {m}), got {ids}")
        if np.any(probs[:, ids] > 0):
            raise ValueError(f"{name} ids {sorted(set(ids.tolist()))} must carry no contextual probability")
    return world._replace(probs=probs)


def seq_world(num_query: int, next_per_query: int, *, num_common: int = 10, common_per_query: int = 0,
              distinct_per_next: int = 10, seq_len: int = 128, distinct_range: tuple[float, float] = (0.1, 1.0),
              common_weight: float = 1.0) -> SeqWorld:
    """The generator of the Scan&Snap experiments.

    K = num_query * next_per_query classes; class n = q * next_per_query + j has query q. Its
    contextual tokens: the `num_common` global common tokens and the `common_per_query` tokens
    of its query, each with unnormalized weight `common_weight`, and `distinct_per_next` tokens of
    its own with weights linspace(*distinct_range); normalized per class. Ids are laid out
    common, per-query common, distinct, queries, next tokens, so
    M = num_common + Q * common_per_query + K * distinct_per_next + Q + K.
    """
    for name, value, low in (("num_query", num_query, 1), ("next_per_query", next_per_query, 1),
                             ("num_common", num_common, 0), ("common_per_query", common_per_query, 0),
                             ("distinct_per_next", distinct_per_next, 0)):
        checks.integer(name, value, minimum=low)
    checks.integer("seq_len", seq_len, minimum=2)
    lo, hi = (checks.number("distinct_range", v, low=0.0, low_open=True) for v in distinct_range)
    checks.number("common_weight", common_weight, low=0.0, low_open=True)
    if num_common + common_per_query + distinct_per_next == 0:
        raise ValueError("a class needs at least one contextual token")
    k = num_query * next_per_query
    query_common_start = num_common
    distinct_start = query_common_start + num_query * common_per_query
    query_start = distinct_start + k * distinct_per_next
    next_start = query_start + num_query
    m = next_start + k
    common = np.arange(num_common)
    query_common = np.arange(query_common_start, distinct_start).reshape(num_query, common_per_query)
    distinct = np.arange(distinct_start, query_start).reshape(k, distinct_per_next)
    query = query_start + np.arange(k) // next_per_query
    probs = np.zeros((k, m))
    probs[:, common] = common_weight
    for n in range(k):
        probs[n, query_common[n // next_per_query]] = common_weight
        probs[n, distinct[n]] = np.linspace(lo, hi, distinct_per_next)
    probs /= probs.sum(1, keepdims=True)
    return check_seq_world(SeqWorld(probs, query, next_start + np.arange(k), common, query_common, distinct,
                                    seq_len))


def sample_sequences(key: jax.Array, world: SeqWorld, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`batch` sequences of classes drawn uniformly (P(n) = 1/K).

    Returns:
      (tokens [batch, T] int32 whose last column is the query, next tokens [batch] int32,
       classes [batch] int32).
    """
    checks.integer("batch", batch, minimum=1)
    k_class, k_tok = jax.random.split(key)
    classes = jax.random.randint(k_class, (batch,), 0, world.num_classes)
    logp = jnp.log(jnp.asarray(world.probs, jnp.float32))
    context = jax.random.categorical(k_tok, logp[classes][:, None, :], shape=(batch, world.seq_len - 1))
    tokens = jnp.concatenate([context, jnp.asarray(world.query)[classes][:, None]], axis=1)
    return tokens.astype(jnp.int32), jnp.asarray(world.next_token)[classes].astype(jnp.int32), classes
