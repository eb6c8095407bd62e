"""alpha-CL: set the pair weights directly and maximize the energy (Tian, NeurIPS 2022).

The min-player picks alpha in A = {alpha >= 0, zero off the negatives, row i of mass m_i} to
minimize sum_j alpha_ij d_ij^2 - R(alpha) (the energy E_alpha up to terms constant on A). Each
regularizer R has a closed-form minimizer, computed row by row on the halved squared distances
d_ij^2 of the 2N anchors (`energy.two_view_sq_dists`):

- "r_H", R = -tau sum alpha log alpha (entropy): alpha_ij = m_i softmax_j(-d_ij^2 / tau).
- "r_gamma", R = sum 2 tau / (1 - gamma) alpha^{1 - gamma}, gamma > 1:
  alpha_ij = (2 tau / (d_ij^2 + lambda_i))^{1/gamma}, lambda_i the multiplier that gives mass m_i
  (found by bisection).
- "r_s", R = -tau/2 sum alpha^2: alpha_ij = max(mu_i - d_ij^2, 0) / tau, a sparsemax whose
  threshold mu_i makes the row sum to m_i. (The public code takes mu at the first dropped index
  instead of the last kept one, so its rows do not sum to the mass it asks for.)
- "direct": alpha_ij proportional to exp(-d_ij^p / tau), p > 1 (d_ij^p = (d_ij^2)^{p/2}; the public
  code's `alpha_exponent` is p / 2), scaled to mass m_i. Not the minimizer of a named R.
- "uniform": alpha_ij = m_i / |neg(i)|, which makes -E_alpha the quadratic loss L_quadratic.

The mass is m_i = xi_i / (eps + xi_i), xi_i = sum_j exp((d_i^2 - d_ij^2) / tau), the row mass
of InfoNCE's min-player (`family.min_player_weights`); with eps = 0 (the default) every row has mass 1.

`alpha_cl_loss(name) = -E_alpha / 2N` with alpha under stop-gradient; "backprop" is r_H's alpha
WITHOUT stop-gradient, so its gradient includes d alpha / d theta. (In the public code the
"backprop" variant detaches alpha as well, so it trains exactly like r_H.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorank.contrastive import energy as energy_lib
from lorank.contrastive import hyper as hyper_lib

WEIGHT_NAMES = ("r_H", "r_gamma", "r_s", "direct", "uniform")
ALPHA_LOSS_NAMES = (*WEIGHT_NAMES, "backprop", "quadratic")  # quadratic = uniform weights
BISECTION_STEPS = 60


def check_name(name: str, names: tuple[str, ...] = ALPHA_LOSS_NAMES) -> str:
    if name not in names:
        raise ValueError(f"unknown alpha-CL weights {name!r}; expected one of {names}")
    return name


def row_mass(d_pos: jax.Array, d_neg: jax.Array, mask: jax.Array, tau: float, eps: float) -> jax.Array:
    """m_i = xi_i / (eps + xi_i), xi_i = sum_j exp((d_i^2 - d_ij^2) / tau): [2N] (1 where eps = 0)."""
    log_xi = jax.nn.logsumexp(jnp.where(mask, (d_pos[:, None] - d_neg) / tau, -jnp.inf), axis=1)
    return jax.nn.sigmoid(log_xi - jnp.log(eps)) if eps > 0 else jnp.ones_like(d_pos)


def entropy_weights(d: jax.Array, mask: jax.Array, mass: jax.Array, tau: float) -> jax.Array:
    """r_H: mass_i softmax over the row's negatives of -d_ij^2 / tau. d, mask [M, K], mass [M] -> [M, K]."""
    return mass[:, None] * jax.nn.softmax(jnp.where(mask, -d / tau, -jnp.inf), axis=1)


def power_weights(d: jax.Array, mask: jax.Array, mass: jax.Array, tau: float, gamma: float) -> jax.Array:
    """r_gamma: (2 tau / (d_ij^2 + lambda_i))^{1/gamma} on the negatives, lambda_i by bisection for mass_i.

    With s = lambda_i + min_j d_ij^2 > 0 the row sum falls monotonically in s from infinity to 0,
    and at the solution 2 tau / mass^gamma <= s <= 2 tau (K / mass)^gamma (K negatives), so the
    bisection runs on log s over that interval. d, mask [M, K], mass [M] -> [M, K].
    """
    big = jnp.finfo(d.dtype).max / 4
    d_min = jnp.min(jnp.where(mask, d, big), axis=1)
    offset = jnp.where(mask, d - d_min[:, None], 0.0)  # d_ij^2 + lambda_i = offset_ij + s_i
    count = jnp.sum(mask, axis=1)
    log_2tau = jnp.log(2.0 * tau)
    lo = log_2tau - gamma * jnp.log(mass)
    hi = log_2tau + gamma * (jnp.log(count.astype(d.dtype)) - jnp.log(mass))

    def weights(log_s):
        return jnp.where(mask, (2.0 * tau / (offset + jnp.exp(log_s)[:, None])) ** (1.0 / gamma), 0.0)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_heavy = jnp.sum(weights(mid), axis=1) > mass  # the sum falls with s: move right
        return jnp.where(too_heavy, mid, lo), jnp.where(too_heavy, hi, mid)

    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (lo, hi))
    return weights(0.5 * (lo + hi))


def sparse_weights(d: jax.Array, mask: jax.Array, mass: jax.Array, tau: float) -> jax.Array:
    """r_s: max(mu_i - d_ij^2, 0) / tau with sum_j = mass_i (sparsemax). d, mask [M, K], mass [M] -> [M, K].

    Sorted ascending, the k smallest distances are kept while d_(k) < mu_k = (tau mass + sum_{l<=k} d_(l)) / k;
    mu is mu_k at the LAST kept k.
    """
    big = jnp.finfo(d.dtype).max / (4 * d.shape[1])  # non-negatives sort last and are never kept
    ordered = jnp.sort(jnp.where(mask, d, big), axis=1)
    k = jnp.arange(1, d.shape[1] + 1, dtype=d.dtype)
    mu_k = (tau * mass[:, None] + jnp.cumsum(ordered, axis=1)) / k
    kept = jnp.sum(ordered < mu_k, axis=1)  # the kept set is a prefix of the sorted row
    mu = jnp.take_along_axis(mu_k, (kept - 1)[:, None], axis=1)
    return jnp.where(mask, jnp.maximum(mu - d, 0.0) / tau, 0.0)


def direct_weights(d: jax.Array, mask: jax.Array, mass: jax.Array, tau: float, p: float) -> jax.Array:
    """direct: exp(-d_ij^p / tau) scaled to mass_i, d_ij^p = (d_ij^2)^{p/2}. [M, K], [M] -> [M, K]."""
    return entropy_weights(jnp.maximum(d, 0.0) ** (p / 2.0), mask, mass, tau)


def uniform_weights(mask: jax.Array, mass: jax.Array) -> jax.Array:
    """uniform: mass_i / |neg(i)| on the negatives. mask [M, K], mass [M] -> [M, K]."""
    return jnp.where(mask, mass[:, None] / jnp.sum(mask, axis=1, keepdims=True), 0.0)


def _weights(name: str, z1: jax.Array, z2: jax.Array, h: dict[str, Any]) -> jax.Array:
    """The [2N, 2N] weights of `name` (gradients flow; callers stop them)."""
    d_pos, d_neg = energy_lib.two_view_sq_dists(z1, z2, normalize=h["normalize"])
    mask = energy_lib.negative_mask(z1.shape[0], h["negatives"])
    tau = h["tau"]
    mass = row_mass(d_pos, d_neg, mask, tau, h["eps"])
    if name in ("r_H", "backprop"):
        return entropy_weights(d_neg, mask, mass, tau)
    if name == "r_gamma":
        return power_weights(d_neg, mask, mass, tau, h["gamma"])
    if name == "r_s":
        return sparse_weights(d_neg, mask, mass, tau)
    if name == "direct":
        return direct_weights(d_neg, mask, mass, tau, h["p"])
    return uniform_weights(mask, mass)


def pair_weights(name: str, z1: jax.Array, z2: jax.Array, **hyper: Any) -> jax.Array:
    """The alpha-CL pair weights `name` over the 2N anchors of a two-view batch, under stop-gradient.

    Args:
      name: one of WEIGHT_NAMES.
      z1, z2: [N, D] the two views (N >= 2).
      **hyper: tau, eps (row mass xi / (eps + xi), default 0: mass 1), p (direct), gamma (r_gamma),
        normalize, negatives (`lorank.contrastive.hyper`).

    Returns:
      [2N, 2N] non-negative, zero on the diagonal, on positive pairs and off the negatives.
    """
    check_name(name, WEIGHT_NAMES)
    h = hyper_lib.resolve(name, hyper, alpha=True)
    return jax.lax.stop_gradient(_weights(name, jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2), h))


def alpha_cl_loss(name: str, z1: jax.Array, z2: jax.Array, **hyper: Any) -> jax.Array:
    """-E_alpha / 2N with the weights `name` held fixed ("backprop": differentiated through).

    Args:
      name: one of ALPHA_LOSS_NAMES ("quadratic" = "uniform": L_quadratic).
      z1, z2, **hyper: as `pair_weights`.

    Returns:
      [] the loss.
    """
    check_name(name)
    h = hyper_lib.resolve(name, hyper, alpha=True)
    weights = "uniform" if name == "quadratic" else name
    if name == "backprop":
        alpha = _weights(weights, z1, z2, h)
    else:
        alpha = jax.lax.stop_gradient(_weights(weights, jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2), h))
    return -energy_lib.two_view_energy(z1, z2, alpha, normalize=h["normalize"], stop_gradient=name != "backprop")
