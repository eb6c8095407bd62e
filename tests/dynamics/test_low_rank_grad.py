"""Gradients of reversible networks become low rank (GaLore, Lemma 3.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.dynamics import low_rank_grad as lrg


def _regression(seed=0, n_samples=200, n=12, m=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_samples, n)) * np.linspace(2.0, 0.3, n)
    return x, rng.normal(size=(n_samples, m)), 0.1 * rng.normal(size=(m, n))


def _masks_numpy(params, x, act):
    """Per-sample gates of each hidden layer, in float64."""
    slope = {"relu": 0.0, "leaky_relu": 0.1}[act]
    gates, h = [], x
    for w in params[:-1]:
        z = h @ w.T
        g = np.where(z > 0, 1.0, slope)
        gates.append(g)
        h = z * g
    return gates


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_gradient_has_the_reversible_form(act):
    """-dL/dW_l = (1/N) sum_i (J_i^T y_i - J_i^T J_i W_l f_i) f_i^T, J_i from explicit gates."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 6)), rng.normal(size=(16, 3))
    params = tuple(np.asarray(w, np.float64) for w in lrg.mlp_init(jax.random.key(0), (6, 5, 4, 3)))
    gates = _masks_numpy(params, x, act)
    grads = lrg.layer_gradients(tuple(jnp.asarray(w) for w in params), jnp.asarray(x),
                                jnp.asarray(y), act)
    for layer in range(3):
        f = x if layer == 0 else (
            x @ params[0].T * gates[0] if layer == 1 else
            ((x @ params[0].T * gates[0]) @ params[1].T) * gates[1])
        want = np.zeros_like(params[layer])
        a_ref, b_ref = [], []
        for i in range(16):
            jac = np.eye(params[layer].shape[0])
            for upper in range(layer + 1, 3):
                jac = params[upper] @ (gates[upper - 1][i][:, None] * jac)
            a_i, b_i = jac.T @ y[i], jac.T @ jac
            want += np.outer(a_i - b_i @ params[layer] @ f[i], f[i]) / 16
            a_ref.append(a_i)
            b_ref.append(b_i)
        np.testing.assert_allclose(grads[layer], want, rtol=1e-4, atol=1e-5)
        a, b, f_got = lrg.reversible_form(tuple(jnp.asarray(w) for w in params), jnp.asarray(x),
                                          jnp.asarray(y), layer, act)
        np.testing.assert_allclose(a, np.array(a_ref), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, np.array(b_ref), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f_got, f, rtol=1e-4, atol=1e-5)


def test_kron_s_acts_as_the_gradient_map():
    rng = np.random.default_rng(2)
    b = rng.normal(size=(4, 3, 3))
    b = b @ b.transpose(0, 2, 1)
    f = rng.normal(size=(4, 5))
    w = rng.normal(size=(3, 5))
    want = np.mean([bi @ w @ np.outer(fi, fi) for bi, fi in zip(b, f)], axis=0)
    np.testing.assert_allclose(lrg.unvec(lrg.kron_s(b, f) @ lrg.vec(w), 3, 5), want, rtol=1e-10)
    same = lrg.kron_s(np.repeat(b[:1], 4, axis=0), f)
    np.testing.assert_allclose(same, np.kron(f.T @ f / 4, b[0]), rtol=1e-10)


def test_bound_constants_by_hand():
    """B = diag(1, 2), C = diag(3, 5): S has eigenvalues 3, 5, 6, 10 on E_11, E_21, E_12, E_22."""
    s = np.kron(np.diag([3.0, 5.0]), np.diag([1.0, 2.0]))
    g = np.array([[2.0, 1.0], [1.0, 1.0]])
    bd = lrg.stable_rank_bound(g, s, lr=0.05, steps=3)
    assert (bd.lam1, bd.lam2) == (3.0, 5.0)
    assert bd.sr_parallel == pytest.approx(1.0)
    assert bd.excess == pytest.approx(3.0 / 4.0)
    assert bd.ratio == pytest.approx((1 - 0.25) / (1 - 0.15))
    np.testing.assert_allclose(bd.bound, 1.0 + 0.75 * bd.ratio ** (2 * np.arange(4)))


def test_stable_rank_obeys_the_bound_and_falls_to_one():
    """One linear layer, l2 loss: B = I and C = X^T X / N are constant, so the lemma is exact."""
    x, y, w = _regression()
    a, b, f = lrg.reversible_form((jnp.asarray(w),), jnp.asarray(x), jnp.asarray(y), 0, "linear")
    s = lrg.kron_s(b, f)
    c = x.T @ x / x.shape[0]
    np.testing.assert_allclose(s, np.kron(c, np.eye(5)), atol=1e-4)
    eta = 0.9 / np.linalg.eigvalsh(c)[-1]
    srs, gs = [], []
    for _ in range(301):  # gradient descent in float64
        g = (y - x @ w.T).T @ x / x.shape[0]
        sv = np.linalg.svd(g, compute_uv=False)
        srs.append((sv**2).sum() / sv[0] ** 2)
        gs.append(g)
        w = w + eta * g
    s_exact = np.kron(c, np.eye(5))
    np.testing.assert_allclose(lrg.vec(gs[1]), lrg.vec(gs[0]) - eta * s_exact @ lrg.vec(gs[0]),
                               rtol=1e-8, atol=1e-10)
    bd = lrg.stable_rank_bound(gs[0], s_exact, eta, 300)
    evals = np.linalg.eigvalsh(c)
    np.testing.assert_allclose([bd.lam1, bd.lam2], evals[:2], rtol=1e-8)
    assert srs[0] > 2.0
    assert np.all(np.array(srs) <= bd.bound + 1e-9)
    assert srs[-1] < 1.001 and bd.bound[-1] < 1.01
    bd_late = lrg.stable_rank_bound(gs[100], s_exact, eta, 200)  # t0 = 100
    assert np.all(np.array(srs[100:]) <= bd_late.bound + 1e-9)


@pytest.mark.parametrize("loss", ["l2", "softmax"])
def test_train_logs_loss_and_stable_rank_of_each_step(loss):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    y = jnp.asarray(np.eye(3)[rng.integers(0, 3, 32)], jnp.float32)
    params = lrg.mlp_init(jax.random.key(1), (6, 5, 3))
    final, log = lrg.train(params, x, y, lr=0.1, steps=3, act="relu", loss=loss)
    p = params
    for t in range(3):
        grads = lrg.layer_gradients(p, x, y, "relu", loss)
        for layer, g in enumerate(grads):
            sv = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)
            np.testing.assert_allclose(log.stable_rank[t, layer], (sv**2).sum() / sv[0] ** 2,
                                       rtol=1e-4)
            np.testing.assert_allclose(log.grad_norm[t, layer], np.sqrt((sv**2).sum()), rtol=1e-4)
        np.testing.assert_allclose(log.loss[t], lrg.loss_fn(p, x, y, "relu", loss), rtol=1e-5)
        p = tuple(w + 0.1 * g for w, g in zip(p, grads))
    for w, w_ref in zip(final, p):
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: lrg.mlp_apply((jnp.ones((2, 2)),), jnp.ones((1, 2)), "tanh"), "'tanh' does not make"),
    (lambda: lrg.loss_fn((jnp.ones((2, 2)),), jnp.ones((1, 2)), jnp.ones((1, 2)), "relu", "hinge"),
     "unknown loss 'hinge'"),
    (lambda: lrg.reversible_form((jnp.ones((2, 2)),), jnp.ones((1, 2)), jnp.ones((1, 2)), 1),
     r"layer=1 must be in \[0, 1\)"),
    (lambda: lrg.train((jnp.ones((2, 2)),), jnp.ones((1, 2)), jnp.ones((1, 2)), lr=0.0, steps=5),
     "lr > 0"),
    (lambda: lrg.stable_rank_bound(np.ones((2, 2)), np.eye(4) * 10, lr=0.5, steps=3),
     "lr=0.5 is too large"),
    (lambda: lrg.stable_rank_bound(np.ones((2, 2)), np.eye(3), lr=0.1, steps=3), r"S must be \[4, 4\]"),
    (lambda: lrg.stable_rank_bound(np.ones((2, 2)), np.eye(4), lr=0.1, steps=3), "single eigenspace"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
