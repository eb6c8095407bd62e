"""How concentrated attention is: entropy and mass support of attention rows.

Pure JAX functions of attention probabilities `probs` [..., T_q, T_k] (softmax over the
last axis: each row is a distribution over keys), so they run inside jit and vmap as
well as on NumPy arrays. A `mask` [..., T_q, T_k] (broadcastable, bool) names the keys a
query may attend to; probability outside it is ignored. For causal attention
(`causal_mask`) query i has i + 1 allowed keys: the first query row has a single key, so
its entropy is 0 whatever the model, and early rows can hold only little entropy.

- `row_entropy`: -sum_j p_ij log p_ij in nats, per query row; log(n) for a uniform row
  over n keys, 0 for a one-hot row and for a row with one allowed key.
- `mean_entropy`: the mean of `row_entropy` over query rows (from `skip_first` on),
  batch and heads; `uniform_mean_entropy` is its value for uniform attention.
- `mass_support`: the fewest keys that hold a fraction `mass` (e.g. 0.9) of a row's
  probability; `mean_mass_support` averages it like `mean_entropy`, and
  `uniform_mean_mass_support` is its value for uniform attention.
- `diagonal_mass`: the mean probability on the query's own position (offset 0) or on
  the key `offset` steps back, which tells sparse attention to one's own or the
  previous token from sparse attention elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks


def causal_mask(t_q: int, t_k: int | None = None) -> jax.Array:
    """bool [t_q, t_k]: True where key j <= query i (queries and keys aligned at position 0)."""
    t_k = t_q if t_k is None else t_k
    return jnp.tril(jnp.ones((t_q, t_k), bool))


def _allowed(probs: jax.Array, mask: jax.Array | None) -> jax.Array:
    """bool, shaped like `probs`: the keys each query may attend to (all of them without a mask)."""
    if mask is None:
        return jnp.ones(probs.shape, bool)
    return jnp.broadcast_to(jnp.asarray(mask, bool), probs.shape)


def row_entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Entropy in nats of each attention row: probs [..., T_q, T_k] -> [..., T_q].

    H_i = -sum_{j allowed} p_ij log p_ij, with 0 log 0 = 0; entries outside `mask`
    (bool, broadcastable to `probs`; None: every key allowed) are left out, not
    renormalized. A row with at most one allowed key has entropy exactly 0. Computed in
    float32 (or the input's wider float type).
    """
    probs = jnp.asarray(probs)
    probs = probs.astype(jnp.promote_types(probs.dtype, jnp.float32))
    allowed = _allowed(probs, mask)
    p = jnp.where(allowed & (probs > 0), probs, 1.0)  # log(1) = 0 where the term is dropped
    terms = jnp.where(allowed & (probs > 0), -probs * jnp.log(p), 0.0)
    entropy = jnp.sum(terms, axis=-1)
    return jnp.where(jnp.sum(allowed, axis=-1) <= 1, 0.0, entropy)


def _row_mean(values: jax.Array, causal: bool, skip_first: int) -> jax.Array:
    """Mean of per-row values [..., T_q] over rows skip_first.. and every leading axis."""
    checks.integer("skip_first", skip_first, minimum=0)
    t_q = values.shape[-1]
    if skip_first >= t_q:
        raise ValueError(f"skip_first={skip_first} leaves no query row of the {t_q}")
    return jnp.mean(values[..., skip_first:])


def _causal_or_none(probs: jax.Array, causal: bool) -> jax.Array | None:
    checks.one_of("causal", causal, (True, False))
    return causal_mask(probs.shape[-2], probs.shape[-1]) if causal else None


def mean_entropy(probs: jax.Array, causal: bool = True, skip_first: int = 1) -> jax.Array:
    """Mean attention entropy in nats: probs [B, H, T, T] (any leading axes) -> scalar.

    `row_entropy` of every query row under the causal mask (`causal`; else every key
    allowed), averaged over batch, heads and the query rows i >= `skip_first`. With
    causal attention row 0 has a single allowed key and so entropy 0 for every model;
    the default `skip_first=1` leaves it out. `skip_first=0` averages every row, as the
    Scan&Snap paper's code does (it adds 1e-8 inside the log, which changes nothing here
    beyond ~1e-7 nats). Row i can hold at most log(i + 1) nats: `uniform_mean_entropy`
    is the value the same average takes for uniform attention.
    """
    probs = jnp.asarray(probs)
    return _row_mean(row_entropy(probs, _causal_or_none(probs, causal)), causal, skip_first)


def uniform_mean_entropy(length: int, causal: bool = True, skip_first: int = 1) -> float:
    """`mean_entropy` of uniform attention over the allowed keys of a length-`length` sequence:
    mean over rows i >= skip_first of log(i + 1) (causal), or log(length)."""
    checks.integer("length", length, minimum=1)
    checks.integer("skip_first", skip_first, minimum=0, maximum=length - 1)
    if not causal:
        return float(np.log(length))
    return float(np.mean(np.log(np.arange(skip_first, length, dtype=np.float64) + 1.0)))


def uniform_mean_mass_support(length: int, mass: float = 0.9, causal: bool = True, skip_first: int = 1) -> float:
    """`mean_mass_support` of uniform attention over the allowed keys of a length-`length` sequence:
    mean over rows i >= skip_first of ceil(mass * (i + 1)) (causal), or ceil(mass * length)."""
    checks.integer("length", length, minimum=1)
    checks.integer("skip_first", skip_first, minimum=0, maximum=length - 1)
    checks.number("mass", mass, low=0.0, high=1.0, low_open=True)
    allowed = np.arange(skip_first, length) + 1.0 if causal else np.full(length - skip_first, float(length))
    return float(np.mean(np.ceil(mass * allowed - 1e-6)))


def diagonal_mass(probs: jax.Array, offset: int = 0, skip_first: int = 1) -> jax.Array:
    """Mean probability on the key `offset` positions before the query: probs [..., T, T] -> scalar.

    The mean of probs[..., i, i - offset] over rows i >= max(offset, skip_first) and every
    leading axis: with offset 0 the mass a query puts on its own position, with offset 1
    on the previous token (1 for attention that always looks one step back).
    """
    checks.integer("offset", offset, minimum=0)
    checks.integer("skip_first", skip_first, minimum=0)
    probs = jnp.asarray(probs)
    t = probs.shape[-1]
    start = max(offset, skip_first)
    if start >= min(t, probs.shape[-2]):
        raise ValueError(f"offset={offset} and skip_first={skip_first} leave no query row of the {probs.shape[-2]}")
    rows = jnp.arange(start, probs.shape[-2])
    return jnp.mean(probs[..., rows, rows - offset])


def mass_support(probs: jax.Array, mass: float = 0.9, mask: jax.Array | None = None,
                 tol: float = 1e-6) -> jax.Array:
    """The fewest keys that hold a fraction `mass` of each row's probability: probs [..., T_q, T_k] -> int32 [..., T_q].

    The smallest k such that the k largest allowed probabilities of the row sum to at
    least `mass - tol` (the tolerance keeps float rounding from adding a key: a uniform
    row over 10 keys needs 9 keys for mass 0.9). 1 for a one-hot row; ceil(mass * n) for a
    uniform row over n keys. Entries outside `mask` (bool, broadcastable; None: all
    allowed) count as zero; a row whose allowed keys hold less than `mass` counts all of them.
    """
    checks.number("mass", mass, low=0.0, high=1.0, low_open=True)
    checks.number("tol", tol, low=0.0)
    probs = jnp.asarray(probs)
    allowed = _allowed(probs, mask)
    probs = jnp.where(allowed, probs.astype(jnp.promote_types(probs.dtype, jnp.float32)), 0.0)
    top = -jnp.sort(-probs, axis=-1)  # descending
    covered = jnp.cumsum(top, axis=-1) >= mass - tol  # [..., T_q, T_k]
    short = jnp.sum(~covered, axis=-1)  # prefixes that fall short of the mass
    return jnp.minimum(short + 1, jnp.sum(allowed, axis=-1)).astype(jnp.int32)


def mean_mass_support(probs: jax.Array, mass: float = 0.9, causal: bool = True, skip_first: int = 1) -> jax.Array:
    """`mass_support` averaged over batch, heads and query rows i >= skip_first: probs [B, H, T, T] -> scalar.

    Uniform causal attention gives the mean over rows of ceil(mass * (i + 1)); one-hot
    attention gives 1. Rows are treated as in `mean_entropy`.
    """
    probs = jnp.asarray(probs)
    support = mass_support(probs, mass, _causal_or_none(probs, causal)).astype(jnp.float32)
    return _row_mean(support, causal, skip_first)
