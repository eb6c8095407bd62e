"""Singular values, stable rank and effective rank against hand values and NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.analysis.spectrum import effective_rank, singular_values, stable_rank


def test_hand_values():
    m = jnp.array([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    np.testing.assert_allclose(singular_values(m), [4.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(stable_rank(m), 25.0 / 16.0, rtol=1e-6)
    p = np.array([4.0, 3.0]) / 7.0
    np.testing.assert_allclose(effective_rank(m), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5])
def test_identity_and_rank_one(n):
    np.testing.assert_allclose(stable_rank(jnp.eye(n)), n, rtol=1e-6)
    np.testing.assert_allclose(effective_rank(jnp.eye(n)), n, rtol=1e-5)
    u, v = jnp.arange(1.0, 5.0), jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(stable_rank(jnp.outer(u, v)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(effective_rank(jnp.outer(u, v)), 1.0, rtol=1e-4)


def test_zero_matrix_has_rank_zero():
    assert float(stable_rank(jnp.zeros((3, 4)))) == 0.0
    assert float(effective_rank(jnp.zeros((3, 4)))) == 0.0


def test_batched_random_matches_numpy_and_is_rotation_invariant():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 6, 5)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1])
    s = np.linalg.svd(m, compute_uv=False)
    want_sr = (s**2).sum(-1) / s[:, 0] ** 2
    p = s / s.sum(-1, keepdims=True)
    want_er = np.exp(-(p * np.log(p)).sum(-1))
    np.testing.assert_allclose(singular_values(jnp.asarray(m)), s, rtol=1e-4)
    np.testing.assert_allclose(stable_rank(jnp.asarray(m)), want_sr, rtol=1e-4)
    np.testing.assert_allclose(effective_rank(jnp.asarray(m)), want_er, rtol=1e-4)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    np.testing.assert_allclose(stable_rank(jnp.asarray(q @ m)), want_sr, rtol=1e-4)
    jitted = jax.jit(stable_rank)(jnp.asarray(m))
    np.testing.assert_allclose(jitted, want_sr, rtol=1e-4)
    assert np.all(np.asarray(stable_rank(jnp.asarray(m))) >= 1.0)


def test_vector_is_rejected():
    with pytest.raises(ValueError, match="expected a matrix"):
        stable_rank(jnp.ones(3))
