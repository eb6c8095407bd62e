"""The L_{phi,psi} family of contrastive losses (Tian, NeurIPS 2022, Table 1) and its min-player.

For 2N anchors (`energy.two_view_sq_dists`: each view of each sample is an anchor once, its
positive the other view) with halved squared distances d_i^2 to the positive and d_ij^2 to the
negatives j (`energy.negative_mask`),

    L_{phi,psi} = 1/(2N) sum_i phi(xi_i),   xi_i = sum_{j in neg(i)} psi(d_i^2 - d_ij^2).

| name         | phi(x)            | psi(x)              |
|--------------|-------------------|---------------------|
| infonce      | tau log(eps + x)  | exp(x / tau)        |
| mine         | log x             | exp(x)              |
| triplet      | x                 | [x + eps]_+         |
| soft_triplet | tau log(1 + x)    | exp(x / tau + eps)  |
| tuplet       | log(1 + x)        | exp(x)              |
| lifted       | [log x]_+^2       | exp(x + eps)        |
| coria        | x                 | sigmoid(c x)        |
| ji           | x                 | x                   |

With eps = 1 and normalized embeddings InfoNCE is tau times SimCLR's NT-Xent cross-entropy
-log(e^{s_ii'/tau} / (e^{s_ii'/tau} + sum_j e^{s_ij/tau})), s the cosine similarity. Where psi is
an exponential the loss is evaluated in the log domain (a masked logsumexp), so large
similarities over tau cannot overflow.

Coordinate-wise view: with alpha_ij = phi'(xi_i) psi'(d_i^2 - d_ij^2) (`min_player_weights`), the
gradient of L_{phi,psi} with respect to anything upstream of the embeddings equals that of
-E_alpha / 2N (`energy.two_view_energy`) with alpha held fixed: the loss is a max-player ascent
step on the energy at the min-player's weights. For exponential psi the rows of alpha have mass
tau^{-1} xi_i phi'(xi_i) (InfoNCE: xi_i / (eps + xi_i), 1 for eps = 0).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorank.contrastive import energy as energy_lib
from lorank.contrastive import hyper as hyper_lib

FAMILY_NAMES = ("infonce", "mine", "triplet", "soft_triplet", "tuplet", "lifted", "coria", "ji")

Scalar = Callable[[jax.Array], jax.Array]


def phi_psi(name: str, **hyper: Any) -> tuple[Scalar, Scalar]:
    """(phi, psi) of family member `name`, elementwise functions with the hyperparameters bound.

    Raises:
      ValueError: an unknown name or a bad hyperparameter (named).
    """
    check_name(name)
    h = hyper_lib.resolve(name, hyper)
    tau, eps, c = h["tau"], h["eps"], h["c"]
    table: dict[str, tuple[Scalar, Scalar]] = {
        "infonce": (lambda x: tau * jnp.log(eps + x), lambda x: jnp.exp(x / tau)),
        "mine": (jnp.log, jnp.exp),
        "triplet": (lambda x: x, lambda x: jax.nn.relu(x + eps)),
        "soft_triplet": (lambda x: tau * jnp.log1p(x), lambda x: jnp.exp(x / tau + eps)),
        "tuplet": (jnp.log1p, jnp.exp),
        "lifted": (lambda x: jax.nn.relu(jnp.log(x)) ** 2, lambda x: jnp.exp(x + eps)),
        "coria": (lambda x: x, lambda x: jax.nn.sigmoid(c * x)),
        "ji": (lambda x: x, lambda x: x),
    }
    return table[name]


def check_name(name: str) -> str:
    if name not in FAMILY_NAMES:
        raise ValueError(f"unknown contrastive loss {name!r}; the L_(phi,psi) family has {FAMILY_NAMES}")
    return name


def pair_differences(z1: jax.Array, z2: jax.Array, *, normalize: bool, negatives: str
                     ) -> tuple[jax.Array, jax.Array]:
    """x_ij = d_i^2 - d_ij^2 over the 2N anchors and the negative mask, each [2N, 2N]."""
    d_pos, d_neg = energy_lib.two_view_sq_dists(z1, z2, normalize=normalize)
    return d_pos[:, None] - d_neg, energy_lib.negative_mask(z1.shape[0], negatives)


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """log sum_{j: mask_ij} exp(x_ij) per row. [M, K] -> [M]; every row has a True."""
    return jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=1)


def anchor_losses(name: str, x: jax.Array, mask: jax.Array, h: dict[str, Any]) -> jax.Array:
    """phi(xi_i) per anchor from x [2N, 2N] and mask [2N, 2N] -> [2N]; exponential psi in log domain."""
    tau, eps = h["tau"], h["eps"]
    if name == "infonce":
        return tau * jnp.logaddexp(jnp.log(eps), _masked_logsumexp(x / tau, mask))
    if name == "mine":
        return _masked_logsumexp(x, mask)
    if name == "soft_triplet":
        return tau * jax.nn.softplus(_masked_logsumexp(x / tau + eps, mask))
    if name == "tuplet":
        return jax.nn.softplus(_masked_logsumexp(x, mask))
    if name == "lifted":
        return jax.nn.relu(_masked_logsumexp(x + eps, mask)) ** 2
    phi, psi = phi_psi(name, **h)
    return phi(jnp.sum(jnp.where(mask, psi(x), 0.0), axis=1))


def family_loss(name: str, z1: jax.Array, z2: jax.Array, **hyper: Any) -> jax.Array:
    """L_{phi,psi} of family member `name`: the mean over the 2N anchors of phi(sum_j psi(d_i^2 - d_ij^2)).

    Args:
      name: one of FAMILY_NAMES.
      z1, z2: [N, D] the two views of N samples (N >= 2).
      **hyper: tau, eps, c, normalize, negatives (`lorank.contrastive.hyper`; p and gamma are ignored).

    Returns:
      [] the loss.
    """
    check_name(name)
    h = hyper_lib.resolve(name, hyper)
    x, mask = pair_differences(z1, z2, normalize=h["normalize"], negatives=h["negatives"])
    return jnp.mean(anchor_losses(name, x, mask, h))


def min_player_weights(name: str, z1: jax.Array, z2: jax.Array, **hyper: Any) -> jax.Array:
    """The min-player's pair weights of family member `name`: alpha_ij = phi'(xi_i) psi'(d_i^2 - d_ij^2).

    Args:
      name, z1, z2, **hyper: as `family_loss`.

    Returns:
      [2N, 2N] non-negative, zero off the negatives, under stop-gradient.
    """
    check_name(name)
    h = hyper_lib.resolve(name, hyper)
    phi, psi = phi_psi(name, **h)
    x, mask = pair_differences(jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2), normalize=h["normalize"],
                               negatives=h["negatives"])
    xi = jnp.sum(jnp.where(mask, psi(x), 0.0), axis=1)
    d_phi = jax.vmap(jax.grad(phi))(xi)
    d_psi = jnp.vectorize(jax.grad(psi))(x)
    return jnp.where(mask, d_phi[:, None] * d_psi, 0.0)
