"""Deep linear contrastive learning is PCA of the contrastive covariance.

For f(x) = W_L ... W_1 x and a fixed pairwise importance alpha, the contrastive
covariance of the output is C_alpha[f] = W X_alpha W^T with W = W_L ... W_1 and
X_alpha = C_alpha[x] (`lorank.contrastive.contrastive_cov`). The max player solves

    max  J(W_1..W_L) = tr(W X_alpha W^T)  (= 2 E_alpha)   s.t.  ||W_l||_F = 1.

Tian (NeurIPS 2022, Theorem 3): at the maximum every W_l is rank one,
W_l = v_l v_{l-1}^T, adjacent layers align (the left singular vector of W_l is the
right singular vector of W_{l+1}), v_0 is the top eigenvector of X_alpha, and
J = lambda_max(X_alpha). This module simulates the gradient-ascent flow on the
product of unit Frobenius spheres,

    dW_l/dt = G_l - <G_l, W_l> W_l / ||W_l||_F^2,   G_l = dJ/dW_l,

and measures the quantities of the theorem.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorank.dynamics.solve import Trajectory, solve

Weights = tuple  # (W_1, ..., W_L), W_l: [d_l, d_{l-1}]


def init_weights(key: jax.Array, dims: Sequence[int]) -> Weights:
    """Gaussian weights, each scaled to unit Frobenius norm.

    Args:
      key: PRNG key.
      dims: [d_0, d_1, ..., d_L] input, hidden and output widths (L >= 1).

    Returns:
      (W_1, ..., W_L) with W_l: [d_l, d_{l-1}] and ||W_l||_F = 1.
    """
    _check_dims(dims)
    keys = jax.random.split(key, len(dims) - 1)
    weights = []
    for k, (d_in, d_out) in zip(keys, zip(dims[:-1], dims[1:])):
        w = jax.random.normal(k, (d_out, d_in))
        weights.append(w / jnp.linalg.norm(w))
    return tuple(weights)


def end_to_end(weights: Weights) -> jax.Array:
    """W = W_L ... W_1: [d_L, d_0]."""
    out = weights[0]
    for w in weights[1:]:
        out = w @ out
    return out


def objective(weights: Weights, x_alpha: jax.Array) -> jax.Array:
    """J = tr(W X_alpha W^T) = tr C_alpha[f] = 2 E_alpha for f(x) = W x.

    Args:
      weights: (W_1, ..., W_L).
      x_alpha: [d_0, d_0] contrastive covariance of the input.

    Returns:
      [] the objective.
    """
    w = end_to_end(weights)
    return jnp.trace(w @ x_alpha @ w.T)


def field(t, weights: Weights, x_alpha: jax.Array) -> Weights:
    """Gradient-ascent flow of J on the product of unit Frobenius spheres.

    Args:
      t: time (unused; the flow is autonomous).
      weights: (W_1, ..., W_L).
      x_alpha: [d_0, d_0] symmetric contrastive covariance.

    Returns:
      (dW_1/dt, ..., dW_L/dt): each gradient minus its component along W_l.
    """
    del t
    grads = jax.grad(objective)(weights, x_alpha)
    return tuple(g - jnp.vdot(g, w) / jnp.vdot(w, w) * w for g, w in zip(grads, weights))


def simulate(weights0: Weights, x_alpha: jax.Array, t1: float, *, num_saves: int = 100,
             rtol: float = 1e-6, atol: float = 1e-8, solver: str = "tsit5") -> Trajectory:
    """Integrates `field` from `weights0` over [0, t1]; vmap it over initial weights.

    Args:
      weights0: (W_1, ..., W_L) initial weights with unit Frobenius norms.
      x_alpha: [d_0, d_0] contrastive covariance.
      t1: horizon; the flow's rate scales with lambda_max(x_alpha).
      num_saves: number of save times, evenly spaced in [0, t1].
      rtol, atol, solver: passed to `solve`.

    Returns:
      Trajectory with ts [T] and ys = (W_1 [T, d_1, d_0], ..., W_L [T, d_L, d_{L-1}]).
    """
    _check_x_alpha(x_alpha, weights0[0].shape[-1])
    ts = jnp.linspace(0.0, t1, num_saves)
    return solve(field, tuple(weights0), t1, args=x_alpha, ts=ts, rtol=rtol, atol=atol,
                 solver=solver)


def simulate_seeds(key: jax.Array, dims: Sequence[int], x_alpha: jax.Array, num_seeds: int,
                   t1: float, *, num_saves: int = 100, rtol: float = 1e-6, atol: float = 1e-8,
                   solver: str = "tsit5") -> Trajectory:
    """`simulate` from `num_seeds` random initializations, vmapped and jitted.

    Args:
      key: PRNG key; split into one key per seed.
      dims: [d_0, ..., d_L] widths.
      x_alpha: [d_0, d_0] contrastive covariance.
      num_seeds: number of random initializations.
      t1, num_saves, rtol, atol, solver: as in `simulate`.

    Returns:
      Trajectory with ts [T] and ys = (W_1 [S, T, d_1, d_0], ...), num_steps [S].
    """
    _check_dims(dims)
    if num_seeds < 1:
        raise ValueError(f"num_seeds={num_seeds} must be >= 1")
    _check_x_alpha(x_alpha, dims[0])
    keys = jax.random.split(key, num_seeds)
    return _simulate_keys(keys, jnp.asarray(x_alpha), tuple(int(d) for d in dims), float(t1),
                          int(num_saves), float(rtol), float(atol), solver)


@functools.partial(jax.jit, static_argnums=(2, 4, 7))  # dims, num_saves, solver; t1 and tolerances traced
def _simulate_keys(keys, x_alpha, dims, t1, num_saves, rtol, atol, solver) -> Trajectory:
    def one(k):
        return simulate(init_weights(k, dims), x_alpha, t1, num_saves=num_saves, rtol=rtol,
                        atol=atol, solver=solver)

    traj = jax.vmap(one)(keys)
    return Trajectory(traj.ts[0], traj.ys, traj.num_steps)


def layer_metrics(weights: Weights, x_alpha: jax.Array) -> dict[str, jax.Array]:
    """The quantities of the theorem, for weights with any leading batch axes.

    Args:
      weights: (W_1, ..., W_L), each [..., d_l, d_{l-1}].
      x_alpha: [d_0, d_0] contrastive covariance.

    Returns:
      dict with
        "sv_ratio": [..., L] sigma_2 / sigma_1 of each W_l (0 when rank one);
        "alignment": [..., L-1] |u_l . v_{l+1}|, left top singular vector of W_l
          against right top singular vector of W_{l+1} (1 when aligned);
        "input_alignment": [...] |v_0 . e_max| between the right top singular vector
          of W_1 and the top eigenvector of x_alpha;
        "objective": [...] J at the weights, normalized to unit Frobenius norms.
    """
    us, vs, ratios = [], [], []
    for w in weights:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        us.append(u[..., :, 0])
        vs.append(vh[..., 0, :])
        ratios.append(s[..., 1] / s[..., 0] if s.shape[-1] > 1 else jnp.zeros(s.shape[:-1]))
    align = [jnp.abs(jnp.sum(us[i] * vs[i + 1], axis=-1)) for i in range(len(weights) - 1)]
    _, evecs = jnp.linalg.eigh(x_alpha)
    top = evecs[:, -1]
    normed = tuple(w / jnp.linalg.norm(w, axis=(-2, -1), keepdims=True) for w in weights)
    batch = normed[0].shape[:-2]
    flat = tuple(w.reshape((-1,) + w.shape[-2:]) for w in normed)
    obj = jax.vmap(lambda *ws: objective(ws, x_alpha))(*flat).reshape(batch)
    return {
        "sv_ratio": jnp.stack(ratios, axis=-1),
        "alignment": jnp.stack(align, axis=-1) if align else jnp.zeros(batch + (0,)),
        "input_alignment": jnp.abs(vs[0] @ top),
        "objective": obj,
    }


def gaussian_views(key: jax.Array, n: int, cov_data: jax.Array,
                   cov_aug: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two augmented views of Gaussian data: x = xbar + e, x' = xbar + e'.

    Args:
      key: PRNG key.
      n: number of samples.
      cov_data: [d, d] covariance of the clean samples xbar ~ N(0, cov_data).
      cov_aug: [d, d] covariance of the augmentation noise e, e' ~ N(0, cov_aug).

    Returns:
      (x, x_prime), each [n, d]. For uniform alpha, C_alpha[x] -> 2 cov_data as n grows:
      the augmentation variance cancels.
    """
    cov_data, cov_aug = jnp.asarray(cov_data), jnp.asarray(cov_aug)
    d = cov_data.shape[0]
    if cov_data.shape != (d, d) or cov_aug.shape != (d, d):
        raise ValueError(f"cov_data {cov_data.shape} and cov_aug {cov_aug.shape} must be [d, d]")
    if n < 2:
        raise ValueError(f"n={n} must be >= 2")
    k0, k1, k2 = jax.random.split(key, 3)
    xbar = jax.random.multivariate_normal(k0, jnp.zeros(d), cov_data, (n,), method="eigh")
    e1 = jax.random.multivariate_normal(k1, jnp.zeros(d), cov_aug, (n,), method="eigh")
    e2 = jax.random.multivariate_normal(k2, jnp.zeros(d), cov_aug, (n,), method="eigh")
    return xbar + e1, xbar + e2


def _check_dims(dims: Sequence[int]) -> None:
    if len(dims) < 2 or any(int(d) < 1 for d in dims):
        raise ValueError(f"dims must list >= 2 positive widths [d_0, ..., d_L], got {list(dims)}")


def _check_x_alpha(x_alpha, d0: int) -> None:
    shape = jnp.shape(x_alpha)
    if shape != (d0, d0):
        raise ValueError(f"x_alpha must be [{d0}, {d0}] to match the input width, got {shape}")
    if isinstance(x_alpha, jax.core.Tracer):
        return
    x = np.asarray(x_alpha, dtype=np.float64)
    if not np.allclose(x, x.T, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(x).max())):
        raise ValueError("x_alpha must be symmetric")
    if np.linalg.eigvalsh(x)[-1] <= 0:
        raise ValueError("x_alpha has no positive eigenvalue: the contrastive objective is "
                         "maximized at zero and the theorem does not apply")
