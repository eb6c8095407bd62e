"""Synthetic data sets of the theory experiments.

`SeqWorld`, `seq_world` and `sample_sequences`: the sequence classes of Scan&Snap (a query, a
next token, contextual tokens common to several classes or distinct to one).
`joma_toy`: JoMA's toy of token frequencies per class. `LatentTree`, `latent_tree`,
`sample_latent_tree` and `cooccurrence_closed_form`: JoMA's stochastic hierarchical binary latent
tree (Theorem 5); `CompositionTree`, `composition_tree` and `sample_composition_tree`: the public
code's deterministic composition tree (Table 1).
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


# ----- JoMA (Tian, Wang, Zhang, Chen, Du, ICLR 2024) ----------------------------------------------

def joma_toy(num_classes: int = 20, num_distinct: int = 10, num_common: int = 10, *, gaussian: bool = True,
             width: float = 30.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The token frequencies of JoMA's toy (its Fig. 2): one sequence per class, one shared query.

    Class y's unnormalized frequencies: U(0, 1/2) draws for every token; with `gaussian`, the first
    `num_distinct` tokens are replaced by the bump exp(-(l - y num_distinct / num_classes)^2 / width),
    so each class has its own salient tokens and the last `num_common` tokens are shared noise.
    Each row is normalized to sum to one.

    Returns:
      (x [num_classes, num_distinct + num_common] float64 with rows summing to one, labels [num_classes]).
    """
    checks.integer("num_classes", num_classes, minimum=2)
    checks.integer("num_distinct", num_distinct, minimum=0)
    checks.integer("num_common", num_common, minimum=0)
    checks.number("width", width, low=0.0, low_open=True)
    if num_distinct + num_common < 1:
        raise ValueError("the toy needs at least one contextual token")
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.5, (num_classes, num_distinct + num_common))
    if gaussian:
        idx = np.arange(num_distinct)
        for y in range(num_classes):
            x[y, :num_distinct] = np.exp(-((idx - y * num_distinct / num_classes) ** 2) / width)
    return x / x.sum(1, keepdims=True), np.arange(num_classes)


class LatentTree(NamedTuple):
    """JoMA's hierarchical binary latent tree (its Theorem 5 and Fig. 5a), a stochastic generator.

    The root y_0 takes one of D values (the sequence's label, uniform). Every other node is a binary
    latent; each node has `branching` children, so level s (s = 1..height) has branching^s nodes and
    the leaves (level `height`) are the tokens: leaf l = 1 means token l appears in the sequence.
    A binary child copies its parent through a symmetric channel: P(child = parent) = (1 + rho) / 2,
    so rho is the correlation of parent and child (rho^H over H levels). A child j of the root
    copies the bit root_codes[y_0, j] through the same channel. Node a of level s has the children
    a * branching + i (i < branching) on level s + 1; leaf l's ancestor on level s is l // branching^(height - s).

    num_classes: D, the values of the root.
    height: levels below the root (>= 1); the leaves are level `height`.
    branching: children per node.
    rho: the channel's correlation, in [-1, 1].
    root_codes: [D, branching] int {0, 1}: the bit each root value sends to each of its children.
    """

    num_classes: int
    height: int
    branching: int
    rho: float
    root_codes: np.ndarray

    @property
    def num_leaves(self) -> int:
        """branching^height tokens."""
        return self.branching**self.height

    def level_size(self, s: int) -> int:
        """Nodes on level s (branching^s; 1 for the root, s = 0)."""
        return self.branching**s


def latent_tree(num_classes: int, height: int, *, rho: float | None = None, branching: int = 2,
                seed: int = 0) -> LatentTree:
    """A `LatentTree` with rho = 1 - 1 / height by default (the regime of Theorem 5's 1 - H / L).

    root_codes: for each child j of the root, a random half of the D root values (rounded down)
    send 1 and the rest 0, so that each child of the root is 1 with probability about 1/2.

    Raises:
      ValueError: num_classes < 2, height < 1, branching < 2, or rho outside [-1, 1].
    """
    checks.integer("num_classes", num_classes, minimum=2)
    checks.integer("tree height", height, minimum=1)
    checks.integer("branching", branching, minimum=2)
    rho = 1.0 - 1.0 / height if rho is None else rho
    rho = checks.number("rho", rho, low=-1.0, high=1.0)
    rng = np.random.default_rng(seed)
    codes = np.zeros((num_classes, branching), np.int64)
    for j in range(branching):
        codes[rng.permutation(num_classes)[: num_classes // 2], j] = 1
    return LatentTree(num_classes, height, branching, rho, codes)


def sample_latent_tree(key: jax.Array, tree: LatentTree, num: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`num` draws of the tree, top down.

    Returns:
      (labels [num] int32 (the root), levels: a tuple of `height` bool arrays, level s = 1..height of
       shape [num, branching^s]; the last one is the leaves, the tokens present).
    """
    checks.integer("num", num, minimum=1)
    labels, levels = _sample_latent_tree(key, jnp.asarray(tree.root_codes, bool), jnp.float32(tree.rho), num,
                                         tree.height, tree.branching)
    return labels, tuple(levels)


def _sample_latent_tree_impl(key, codes, rho, num, height, branching):
    keys = jax.random.split(key, height + 1)
    labels = jax.random.randint(keys[0], (num,), 0, codes.shape[0])
    parent = codes[labels]  # [num, branching]: the bits the root sends to its children
    levels = []
    for s in range(1, height + 1):
        if s > 1:
            parent = jnp.repeat(levels[-1], branching, axis=1)
        levels.append(parent ^ jax.random.bernoulli(keys[s], (1.0 - rho) / 2.0, parent.shape))
    return labels.astype(jnp.int32), levels


_sample_latent_tree = jax.jit(_sample_latent_tree_impl, static_argnums=(3, 4, 5))


def lca_height(tree: LatentTree, leaf_a: int, leaf_b: int) -> int:
    """How many levels above the leaves the lowest common ancestor of two leaves is (0 for the same leaf;
    `height` when it is the root)."""
    checks.integer("leaf_a", leaf_a, minimum=0, maximum=tree.num_leaves - 1)
    checks.integer("leaf_b", leaf_b, minimum=0, maximum=tree.num_leaves - 1)
    up = 0
    while leaf_a != leaf_b:
        leaf_a, leaf_b, up = leaf_a // tree.branching, leaf_b // tree.branching, up + 1
    return up


def cooccurrence_closed_form(levels_up: int | np.ndarray, rho: float) -> np.ndarray:
    """Theorem 5's P(y_l = 1 | y_m = 1) = (1 + rho^(2H)) / 2 for two leaves whose lowest common ancestor is a
    binary latent with P(1) = 1/2, H levels up (float64): the 2H channels between them have correlation
    rho^(2H). With rho = 1 - 1/L it is (1 + (1 - 1/L)^(2H)) / 2 = 1 - H/L + O(H^2 / L^2).
    """
    h = np.asarray(levels_up, np.float64)
    if np.any(h < 1):
        raise ValueError(f"levels_up must be >= 1 (distinct leaves), got {levels_up!r}")
    checks.number("rho", rho, low=-1.0, high=1.0)
    return 0.5 * (1.0 + rho ** (2.0 * h))


def tree_cooccurrence(tree: LatentTree, token: int, given: int) -> float:
    """The exact P(y_token = 1 | y_given = 1) of this tree (float64), whatever the lowest common ancestor.

    With a = the LCA, H levels up, P(y = 1 | a) = 1/2 + rho^H (a - 1/2) for a binary a; when a is the
    root, the leaf under root child j has P(y = 1 | y_0) = 1/2 + rho^L (root_codes[y_0, j] - 1/2).
    Then P(y_token = 1, y_given = 1) = E_a[P(y_token = 1 | a) P(y_given = 1 | a)] over the LCA's marginal.
    """
    up = lca_height(tree, token, given)
    if up == 0:
        return 1.0
    rho, height, b = tree.rho, tree.height, tree.branching
    if up == height:  # the root: average over its D values
        p_token = 0.5 + rho**height * (tree.root_codes[:, token // b ** (height - 1)] - 0.5)
        p_given = 0.5 + rho**height * (tree.root_codes[:, given // b ** (height - 1)] - 0.5)
        return float(np.mean(p_token * p_given) / np.mean(p_given))
    s = height - up  # the LCA's level (>= 1): its marginal, from the root's child above it
    pi = 0.5 + rho**s * (np.mean(tree.root_codes[:, token // b ** (height - 1)]) - 0.5)
    p1, p0 = 0.5 + rho**up * 0.5, 0.5 - rho**up * 0.5
    return float((pi * p1**2 + (1 - pi) * p0**2) / (pi * p1 + (1 - pi) * p0))


def tokens_to_sequences(present: jax.Array, seq_len: int, pad_id: int) -> jax.Array:
    """Sequences of the tokens present: [N, V] bool -> [N, seq_len] int32, each row's present token ids in
    ascending order at the end, pre-padded with `pad_id`.

    Raises:
      ValueError: seq_len smaller than V (a row could not hold every token).
    """
    num_tokens = present.shape[-1]
    checks.integer("seq_len", seq_len, minimum=max(1, num_tokens))
    ids = jnp.where(present, jnp.arange(num_tokens), -1)
    ids = jnp.sort(ids, axis=-1)  # absent (-1) first, present ascending at the end
    ids = jnp.concatenate([jnp.full(present.shape[:-1] + (seq_len - num_tokens,), -1, ids.dtype), ids], axis=-1)
    return jnp.where(ids < 0, pad_id, ids).astype(jnp.int32)


class CompositionTree(NamedTuple):
    """The public JoMA code's deterministic composition tree (its Table 1 data), built once from a seed.

    Level 0 is the vocabulary of M - 1 tokens (id M - 1 pads); a latent of level s >= 1 is a unique
    random subset of size combinations[s - 1] of the latents of level s - 1, and the top level's
    latents are the classes. A sequence of class y holds, in ascending order and pre-padded to length
    L, every token reached from y by taking the union of the subsets level by level down.

    num_tokens: M, including the padding token M - 1.
    seq_len: L.
    children: one [n_s, combinations[s - 1]] int array per level s = 1..S (sorted rows): indices into level s - 1.
    """

    num_tokens: int
    seq_len: int
    children: tuple[np.ndarray, ...]

    @property
    def num_classes(self) -> int:
        return self.children[-1].shape[0]

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """(M - 1, n_1, ..., n_S): the sizes of levels 0..S."""
        return (self.num_tokens - 1,) + tuple(c.shape[0] for c in self.children)

    def membership(self, s: int) -> np.ndarray:
        """[n_s, n_{s-1}] bool: latent a of level s contains latent b of level s - 1."""
        out = np.zeros((self.level_sizes[s], self.level_sizes[s - 1]), bool)
        np.put_along_axis(out, self.children[s - 1], True, axis=1)
        return out


def composition_tree(num_tokens: int, seq_len: int, levels: list[int] | tuple[int, ...],
                     combinations: list[int] | tuple[int, ...], seed: int = 0
                     ) -> CompositionTree:
    """Builds a `CompositionTree` with levels[s] latents on level s + 1 (the last = the classes), each a unique
    random subset of size combinations[s] of the level below (the public code's `num_tokens`,
    `num_combinations`; its Table 1: M = 100, L = 30, levels [10, 20, classes] or [20, 30, classes],
    combinations [2, 2, 2] or [3, 3, 3]).

    Raises:
      ValueError: tree height (len(levels)) < 1, lengths that differ, a level with fewer than one latent,
        combinations < 1 or larger than the level below, fewer distinct subsets than latents asked for,
        num_tokens < 3, or a class with more tokens than seq_len.
    """
    from math import comb

    levels, combinations = list(levels), list(combinations)
    if len(levels) < 1:
        raise ValueError(f"tree height must be >= 1 (at least one level of latents), got levels={levels}")
    if len(combinations) != len(levels):
        raise ValueError(f"combinations {combinations} must have one entry per level {levels}")
    checks.integer("num_tokens", num_tokens, minimum=3)
    checks.integer("seq_len", seq_len, minimum=1)
    rng = np.random.default_rng(seed)
    below = num_tokens - 1
    children = []
    for s, (n, c) in enumerate(zip(levels, combinations)):
        checks.integer(f"levels[{s}]", n, minimum=1)
        checks.integer(f"combinations[{s}]", c, minimum=1)
        if c > below:
            raise ValueError(f"combinations[{s}]={c} is larger than the level below it ({below} latents)")
        if comb(below, c) < n:
            raise ValueError(f"levels[{s}]={n} unique subsets of size {c} do not exist among {below} latents "
                             f"({comb(below, c)} do)")
        seen: set[tuple[int, ...]] = set()
        rows = []
        while len(rows) < n:
            subset = tuple(sorted(rng.choice(below, c, replace=False).tolist()))
            if subset not in seen:
                seen.add(subset)
                rows.append(subset)
        children.append(np.asarray(rows, np.int64))
        below = n
    tree = CompositionTree(num_tokens, seq_len, tuple(children))
    most = int(_composition_active(tree, np.eye(tree.num_classes, dtype=bool))[0].sum(1).max())
    if most > seq_len:
        raise ValueError(f"seq_len={seq_len} cannot hold a class with {most} tokens")
    return tree


def _composition_active(tree: CompositionTree, top: np.ndarray | jax.Array) -> list:
    """Active latents of levels 0..S (bottom first) from the top level's [N, n_S] indicator (NumPy or JAX)."""
    xp = jnp if isinstance(top, jax.Array) else np
    active = [top]
    for s in range(len(tree.children), 0, -1):
        member = xp.asarray(tree.membership(s), xp.float32)
        active.append((xp.asarray(active[-1], xp.float32) @ member) > 0)
    return active[::-1]


def sample_composition_tree(key: jax.Array, tree: CompositionTree, num: int
                            ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """`num` sequences of uniformly drawn classes.

    Returns:
      (tokens [num, L] int32: each class's tokens ascending at the end, pre-padded with M - 1;
       labels [num] int32;
       active: a tuple of S bool arrays, level s = 1..S of shape [num, n_s]: which latents of that level
       the sequence's class reaches (the last one is the label's one-hot)).
    """
    checks.integer("num", num, minimum=1)
    labels = jax.random.randint(key, (num,), 0, tree.num_classes)
    active = _composition_active(tree, jax.nn.one_hot(labels, tree.num_classes, dtype=bool))
    present = jnp.pad(active[0], ((0, 0), (0, 1)))  # the padding token is never present
    tokens = tokens_to_sequences(present, max(tree.seq_len, tree.num_tokens), tree.num_tokens - 1)[:, -tree.seq_len:]
    return tokens, labels.astype(jnp.int32), tuple(active[1:])
