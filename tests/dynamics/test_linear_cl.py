"""Deep linear contrastive learning is PCA of X_alpha (Tian, NeurIPS 2022, Theorem 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.dynamics import linear_cl

D = 10
DIMS = (D, 8, 6, 4)


def _x_alpha_numpy(x, xp):
    """Uniform-alpha contrastive covariance in float64: 2 cov(x) - (1/N) sum (x-x')(x-x')^T."""
    n = x.shape[0]
    return 2 * np.cov(x, rowvar=False) - (x - xp).T @ (x - xp) / n


@pytest.fixture(scope="module")
def problem():
    """Gaussian data whose largest-variance direction is augmentation noise, not signal."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    cov_data = (q * np.linspace(2.0, 0.2, D)) @ q.T
    cov_aug = 3.0 * np.outer(q[:, 5], q[:, 5]) + 0.05 * np.eye(D)
    x, xp = linear_cl.gaussian_views(jax.random.key(1), 400, jnp.asarray(cov_data),
                                     jnp.asarray(cov_aug))
    x, xp = np.asarray(x, np.float64), np.asarray(xp, np.float64)
    x_alpha = _x_alpha_numpy(x, xp)
    evals, evecs = np.linalg.eigh(x_alpha)
    traj = linear_cl.simulate_seeds(jax.random.key(2), DIMS, jnp.asarray(x_alpha, jnp.float32),
                                    num_seeds=4, t1=60.0 / evals[-1], num_saves=30)
    return dict(x=x, xp=xp, x_alpha=x_alpha, lam=evals[-1], top=evecs[:, -1],
                raw_top=np.linalg.eigh(np.cov(x, rowvar=False))[1][:, -1], traj=traj)


def test_converges_to_rank_one_aligned_pca_solution(problem):
    ws = [np.asarray(w[:, -1], np.float64) for w in problem["traj"].ys]
    for seed in range(4):
        for layer, w in enumerate(ws):
            s = np.linalg.svd(w[seed], compute_uv=False)
            assert s[1] / s[0] < 1e-3, f"layer {layer} of seed {seed} is not rank one: {s}"
        for i in range(len(ws) - 1):
            u = np.linalg.svd(ws[i][seed])[0][:, 0]
            v = np.linalg.svd(ws[i + 1][seed])[2][0]
            assert abs(u @ v) > 0.999, f"layers {i} and {i + 1} of seed {seed} are not aligned"
        v0 = np.linalg.svd(ws[0][seed])[2][0]
        assert abs(v0 @ problem["top"]) > 0.999
        end = ws[-1][seed] @ ws[-2][seed] @ ws[-3][seed]
        j = np.trace(end @ problem["x_alpha"] @ end.T)
        np.testing.assert_allclose(j, problem["lam"], rtol=1e-3)


def test_pca_is_of_x_alpha_not_of_the_raw_views(problem):
    """The augmentation direction dominates cov(x) but cancels in X_alpha."""
    v0 = np.linalg.svd(np.asarray(problem["traj"].ys[0][0, -1], np.float64))[2][0]
    assert abs(v0 @ problem["raw_top"]) < 0.3


def test_objective_rises_monotonically_and_stays_below_lambda_max(problem):
    ws = [np.asarray(w[0], np.float64) for w in problem["traj"].ys]  # seed 0, all times
    js = []
    for t in range(ws[0].shape[0]):
        layers = [w[t] / np.linalg.norm(w[t]) for w in ws]
        end = layers[2] @ layers[1] @ layers[0]
        js.append(np.trace(end @ problem["x_alpha"] @ end.T))
    js = np.array(js)
    assert np.all(np.diff(js) > -1e-5 * problem["lam"])
    assert np.all(js <= problem["lam"] * (1 + 1e-5))
    norms = [np.linalg.norm(w, axis=(1, 2)) for w in ws]
    np.testing.assert_allclose(norms, 1.0, atol=1e-3)


def test_layer_metrics_agree_with_numpy(problem):
    final = tuple(w[:, -1] for w in problem["traj"].ys)
    m = linear_cl.layer_metrics(final, jnp.asarray(problem["x_alpha"], jnp.float32))
    assert m["sv_ratio"].shape == (4, 3) and m["alignment"].shape == (4, 2)
    np.testing.assert_allclose(m["input_alignment"], 1.0, atol=1e-3)
    np.testing.assert_allclose(m["objective"], problem["lam"], rtol=1e-3)


def test_rank_one_construction_attains_lambda_max():
    rng = np.random.default_rng(3)
    x_alpha = rng.normal(size=(5, 5))
    x_alpha = x_alpha @ x_alpha.T
    evals, evecs = np.linalg.eigh(x_alpha)
    vs = [evecs[:, -1]] + [v / np.linalg.norm(v) for v in rng.normal(size=(2, 4))]
    ws = (jnp.asarray(np.outer(vs[1], vs[0])), jnp.asarray(np.outer(vs[2], vs[1])))
    np.testing.assert_allclose(linear_cl.objective(ws, jnp.asarray(x_alpha)), evals[-1],
                               rtol=1e-5)


def test_field_is_the_projected_gradient():
    """Closed-form gradient for L = 2: dJ/dW1 = 2 W2^T W2 W1 X, dJ/dW2 = 2 W2 W1 X W1^T."""
    rng = np.random.default_rng(4)
    x_alpha = rng.normal(size=(5, 5))
    x_alpha = x_alpha + x_alpha.T
    w1, w2 = rng.normal(size=(3, 5)), rng.normal(size=(2, 3))
    w1, w2 = w1 / np.linalg.norm(w1), w2 / np.linalg.norm(w2)
    g1, g2 = 2 * w2.T @ w2 @ w1 @ x_alpha, 2 * w2 @ w1 @ x_alpha @ w1.T
    d1, d2 = linear_cl.field(0.0, (jnp.asarray(w1), jnp.asarray(w2)), jnp.asarray(x_alpha))
    np.testing.assert_allclose(d1, g1 - np.sum(g1 * w1) * w1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d2, g2 - np.sum(g2 * w2) * w2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims,x_alpha,match", [
    ((4,), np.eye(4), "at least|>= 2 positive widths"),
    ((4, 0, 2), np.eye(4), ">= 2 positive widths"),
    ((4, 3), np.eye(3), r"must be \[4, 4\]"),
    ((3, 2), np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "symmetric"),
    ((3, 2), -np.eye(3), "no positive eigenvalue"),
])
def test_bad_input(dims, x_alpha, match):
    with pytest.raises(ValueError, match=match):
        linear_cl.simulate_seeds(jax.random.key(0), dims, jnp.asarray(x_alpha), 2, 1.0)
