"""Distances, contrastive covariance and E_alpha against float64 NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.contrastive import contrastive_cov, energy, positive_sq_dists, sq_dists, uniform_alpha


def _batch(seed, n=7, d=4):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    return a, a + 0.3 * rng.normal(size=(n, d)), rng.uniform(size=(n, n))


def _cov_loop(a, ap, alpha, b, bp):
    """C_alpha[a, b] by its definition, one pair at a time."""
    n = a.shape[0]
    out = np.zeros((a.shape[1], b.shape[1]))
    for i in range(n):
        r_i = sum(alpha[i, j] for j in range(n) if j != i)
        out -= r_i * np.outer(a[i] - ap[i], b[i] - bp[i])
        for j in range(n):
            if j != i:
                out += alpha[i, j] * np.outer(a[i] - a[j], b[i] - b[j])
    return out


def _energy_loop(z, zp, alpha):
    n = z.shape[0]
    return 0.5 * sum(alpha[i, j] * (np.sum((z[i] - z[j]) ** 2) - np.sum((z[i] - zp[i]) ** 2))
                     for i in range(n) for j in range(n) if j != i)


def test_contrastive_cov_matches_definition():
    a, ap, alpha = _batch(0)
    rng = np.random.default_rng(1)
    b, bp = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    got = contrastive_cov(jnp.asarray(a), jnp.asarray(ap), jnp.asarray(alpha), jnp.asarray(b),
                          jnp.asarray(bp))
    np.testing.assert_allclose(got, _cov_loop(a, ap, alpha, b, bp), rtol=1e-4, atol=1e-5)
    sym = contrastive_cov(jnp.asarray(a), jnp.asarray(ap), jnp.asarray(alpha))
    np.testing.assert_allclose(sym, _cov_loop(a, ap, alpha, a, ap), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sym, np.asarray(sym).T, atol=1e-5)


def test_diagonal_of_alpha_is_ignored():
    a, ap, alpha = _batch(2)
    alpha2 = alpha.copy()
    np.fill_diagonal(alpha2, 100.0)
    np.testing.assert_allclose(contrastive_cov(a, ap, alpha), contrastive_cov(a, ap, alpha2),
                               rtol=1e-6)
    np.testing.assert_allclose(energy(a, ap, alpha), energy(a, ap, alpha2), rtol=1e-6)


def test_energy_matches_definition_and_half_trace():
    z, zp, alpha = _batch(3)
    e = float(energy(jnp.asarray(z), jnp.asarray(zp), jnp.asarray(alpha)))
    np.testing.assert_allclose(e, _energy_loop(z, zp, alpha), rtol=1e-5)
    np.testing.assert_allclose(e, 0.5 * np.trace(_cov_loop(z, zp, alpha, z, zp)), rtol=1e-5)


def test_uniform_alpha_closed_form():
    """Uniform alpha: C = 2 cov(x) - (1/N) sum_i (x_i - x_i')(x_i - x_i')^T (unbiased cov)."""
    x, xp, _ = _batch(4, n=30, d=5)
    want = 2 * np.cov(x, rowvar=False) - (x - xp).T @ (x - xp) / 30
    np.testing.assert_allclose(contrastive_cov(x, xp, uniform_alpha(30)), want, rtol=1e-4,
                               atol=1e-5)
    al = np.asarray(uniform_alpha(5))
    np.testing.assert_allclose(al.sum(axis=1), 1 / 5, rtol=1e-6)
    assert np.all(np.diag(al) == 0)


def test_linear_map_and_energy_gradient():
    """C[x W^T] = W C[x] W^T, and d E_alpha / dW = W X_alpha for f(x) = W x."""
    x, xp, alpha = _batch(5, n=9, d=4)
    w = np.random.default_rng(6).normal(size=(3, 4))
    x_alpha = _cov_loop(x, xp, alpha, x, xp)
    got = contrastive_cov(jnp.asarray(x @ w.T), jnp.asarray(xp @ w.T), jnp.asarray(alpha))
    np.testing.assert_allclose(got, w @ x_alpha @ w.T, rtol=1e-4, atol=1e-4)
    grad = jax.grad(lambda m: energy(jnp.asarray(x) @ m.T, jnp.asarray(xp) @ m.T,
                                     jnp.asarray(alpha)))(jnp.asarray(w))
    np.testing.assert_allclose(grad, w @ x_alpha, rtol=1e-4, atol=1e-4)


def test_alpha_gets_no_gradient():
    z, zp, alpha = _batch(7)
    g = jax.grad(lambda al: energy(jnp.asarray(z), jnp.asarray(zp), al))(jnp.asarray(alpha))
    assert np.all(np.asarray(g) == 0)


def test_distances():
    z1, z2, _ = _batch(8, n=5, d=3)
    want = ((z1[:, None, :] - z2[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(sq_dists(z1, z2[:4]), want[:, :4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(positive_sq_dists(z1, z2), np.diag(want), rtol=1e-5)
    assert np.all(np.asarray(sq_dists(z1, z1)) >= 0)


@pytest.mark.parametrize("call,match", [
    (lambda: contrastive_cov(np.ones((4, 2)), np.ones((4, 3)), np.ones((4, 4))), "same shape"),
    (lambda: contrastive_cov(np.ones((4, 2)), np.ones((4, 2)), np.ones((3, 3))),
     r"alpha must have shape \(4, 4\)"),
    (lambda: contrastive_cov(np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 4)), np.ones((4, 2))),
     "both b and b_prime"),
    (lambda: energy(np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 1))), "at least 2 samples"),
    (lambda: energy(np.ones(4), np.ones(4), np.ones((4, 4))), "must be 2-D"),
    (lambda: uniform_alpha(1), "at least 2 samples"),
    (lambda: sq_dists(np.ones((3, 2)), np.ones((3, 4))), "same feature size"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_none_alpha_is_the_uniform_fast_path():
    x, xp, _ = _batch(9, n=12, d=4)
    rng = np.random.default_rng(10)
    b, bp = rng.normal(size=(12, 2)), rng.normal(size=(12, 2))
    uni = uniform_alpha(12)
    np.testing.assert_allclose(contrastive_cov(x, xp, None), contrastive_cov(x, xp, uni),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(contrastive_cov(x, xp, None, b, bp),
                               _cov_loop(x, xp, np.asarray(uni, np.float64), b, bp),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(energy(x, xp, None), energy(x, xp, uni), rtol=1e-5)
