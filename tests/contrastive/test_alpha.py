"""alpha-CL: every closed-form min-player against a generic constrained minimizer (SciPy, float64), the rows'
masses, the quadratic loss, backprop's gradient, gradients of -E_alpha with alpha held fixed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import optimize

from lorank import contrastive as C


def _views(seed, n=4, d=3, noise=0.5):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d))
    return z1, z1 + noise * rng.normal(size=(n, d))


def _distances(z1, z2):
    """Float64 d_i^2 [2N] and d_ij^2 [2N, 2N] of the normalized anchors."""
    f = np.concatenate([z1, z2])
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n = len(z1)
    d_neg = np.sum((f[:, None] - f[None]) ** 2, axis=-1) / 2
    d_pos = np.array([d_neg[i, (i + n) % (2 * n)] for i in range(2 * n)])
    return d_pos, d_neg


def _negatives(i, n):
    return [j for j in range(2 * n) if j % n != i % n]


def _regularizer(name, tau, gamma):
    if name == "r_H":
        return lambda a: -tau * np.sum(a * np.log(a))
    if name == "r_gamma":
        return lambda a: np.sum(2 * tau / (1 - gamma) * a ** (1 - gamma))
    return lambda a: -tau / 2 * np.sum(a ** 2)


def _constrained_min(d, mass, regularizer):
    """argmin_{alpha >= 0, sum alpha = mass} sum alpha d - R(alpha), by SLSQP from the uniform point."""
    k = len(d)
    result = optimize.minimize(lambda a: a @ d - regularizer(a), np.full(k, mass / k), method="SLSQP",
                               bounds=[(1e-12, mass)] * k,
                               constraints=[{"type": "eq", "fun": lambda a: np.sum(a) - mass}],
                               options={"ftol": 1e-14, "maxiter": 1000})
    assert result.success, result.message
    return result.x


@pytest.mark.parametrize("name, tau, eps", [("r_H", 0.5, 0.0), ("r_H", 0.3, 0.8), ("r_gamma", 0.5, 0.0),
                                            ("r_gamma", 0.2, 0.5), ("r_s", 0.5, 0.0), ("r_s", 0.05, 0.0),
                                            ("r_s", 0.3, 1.5)])
def test_closed_form_min_players_match_a_constrained_minimizer(name, tau, eps):
    z1, z2 = _views(0)
    gamma = 3.0
    alpha = np.asarray(C.pair_weights(name, jnp.asarray(z1), jnp.asarray(z2), tau=tau, eps=eps, gamma=gamma),
                       np.float64)
    d_pos, d_neg = _distances(z1, z2)
    n = len(z1)
    for i in range(2 * n):
        neg = _negatives(i, n)
        xi = np.sum(np.exp((d_pos[i] - d_neg[i, neg]) / tau))
        mass = xi / (eps + xi)
        want = _constrained_min(d_neg[i, neg], mass, _regularizer(name, tau, gamma))
        np.testing.assert_allclose(alpha[i, neg], want, atol=2e-4)
        assert np.sum(alpha[i, neg]) == pytest.approx(mass, rel=2e-5, abs=1e-6)
        assert np.all(alpha[i, [j for j in range(2 * n) if j not in neg]] == 0)


def test_sparse_weights_are_sparse_and_their_rows_carry_the_mass():
    z1, z2 = _views(1, n=16, d=8)
    alpha = np.asarray(C.pair_weights("r_s", jnp.asarray(z1), jnp.asarray(z2), tau=0.05))
    mask = np.asarray(C.negative_mask(16))
    np.testing.assert_allclose(alpha.sum(1), 1.0, rtol=1e-5)
    kept = (alpha > 0).sum(1)
    assert kept.min() >= 1 and kept.max() < mask.sum(1).min()  # some negatives dropped in every row
    d_pos, d_neg = _distances(z1, z2)
    # the threshold taken at the first dropped index (the public code) instead of the last kept one
    # gives rows of another mass
    for i in range(4):
        d = np.sort(d_neg[i, _negatives(i, 16)])
        mu = (0.05 + np.cumsum(d)) / np.arange(1, len(d) + 1)
        off_by_one = np.sum(np.maximum(mu[kept[i]] - d, 0) / 0.05)
        assert abs(off_by_one - 1.0) > 1e-3


def test_direct_weights_and_uniform_weights():
    z1, z2 = _views(2, n=5)
    tau, p = 0.4, 4.0
    d_pos, d_neg = _distances(z1, z2)
    direct = np.asarray(C.pair_weights("direct", jnp.asarray(z1), jnp.asarray(z2), tau=tau, p=p))
    uniform = np.asarray(C.pair_weights("uniform", jnp.asarray(z1), jnp.asarray(z2)))
    for i in range(10):
        neg = _negatives(i, 5)
        w = np.exp(-np.sqrt(d_neg[i, neg]) ** p / tau)
        np.testing.assert_allclose(direct[i, neg], w / w.sum(), rtol=2e-5)
        np.testing.assert_allclose(uniform[i, neg], 1 / len(neg), rtol=1e-6)
    # p = 2 is r_H
    np.testing.assert_allclose(C.pair_weights("direct", jnp.asarray(z1), jnp.asarray(z2), tau=tau, p=2.0),
                               C.pair_weights("r_H", jnp.asarray(z1), jnp.asarray(z2), tau=tau), rtol=2e-5)


def test_one_view_negatives():
    z1, z2 = _views(3, n=5)
    alpha = np.asarray(C.pair_weights("r_H", jnp.asarray(z1), jnp.asarray(z2), negatives="one_view"))
    assert ((alpha > 0).sum(1) == 4).all()
    assert np.all(alpha[:5, 5:] == 0) and np.all(alpha[5:, :5] == 0)


def test_quadratic_loss_is_mean_positive_minus_mean_negative_distance():
    z1, z2 = _views(4, n=6)
    d_pos, d_neg = _distances(z1, z2)
    mask = np.asarray(C.negative_mask(6))
    want = d_pos.mean() - d_neg[mask].mean()  # rows have equal counts, so the row means average to this
    assert float(C.alpha_cl_loss("quadratic", jnp.asarray(z1), jnp.asarray(z2))) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", C.WEIGHT_NAMES)
def test_alpha_cl_loss_is_minus_the_energy_with_alpha_fixed(name):
    z1, z2 = (jnp.asarray(z, jnp.float32) for z in _views(5))
    alpha = C.pair_weights(name, z1, z2)
    d_pos, d_neg = _distances(np.asarray(z1, np.float64), np.asarray(z2, np.float64))
    want = -np.sum(np.asarray(alpha, np.float64) * (d_neg - d_pos[:, None])) / 8
    assert float(C.alpha_cl_loss(name, z1, z2)) == pytest.approx(want, rel=1e-5)
    check_grads(lambda a, b: -C.two_view_energy(a, b, alpha), (z1, z2), order=1, modes=("rev",), atol=2e-2,
                rtol=2e-2, eps=1e-2)
    g = jax.grad(lambda a: C.alpha_cl_loss(name, a, z2))(z1)
    g_fixed = jax.grad(lambda a: -C.two_view_energy(a, z2, alpha))(z1)
    np.testing.assert_allclose(g, g_fixed, rtol=1e-5, atol=1e-7)


def test_backprop_differs_from_r_h_in_its_gradient_only():
    z1, z2 = (jnp.asarray(z, jnp.float32) for z in _views(6))
    assert float(C.alpha_cl_loss("backprop", z1, z2)) == pytest.approx(float(C.alpha_cl_loss("r_H", z1, z2)))
    g_back = jax.grad(lambda a: C.alpha_cl_loss("backprop", a, z2))(z1)
    g_rh = jax.grad(lambda a: C.alpha_cl_loss("r_H", a, z2))(z1)
    assert float(jnp.max(jnp.abs(g_back - g_rh))) > 1e-2 * float(jnp.max(jnp.abs(g_rh)))
    check_grads(lambda a, b: C.alpha_cl_loss("backprop", a, b), (z1, z2), order=1, modes=("rev",), atol=2e-2,
                rtol=2e-2, eps=1e-2)
