"""GaLore on G = sum_i A_i - B_i W C_i: the projected gradient shrinks geometrically inside a
fixed subspace (so the loss stalls there), and refreshing the subspace reaches the optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank.dynamics import low_rank_grad as lrg
from lorank.optim.galore import scale_by_galore

M, N_COLS, RANK, STEPS = 12, 20, 3, 600


@pytest.fixture(scope="module")
def problem():
    prob = lrg.lsq_problem(jax.random.key(0), M, N_COLS, num_terms=3)
    a, b, c = (np.asarray(t, np.float64) for t in prob)
    s = np.mean([np.kron(ci, bi) for bi, ci in zip(b, c)], axis=0)
    w_star = lrg.unvec(np.linalg.solve(s, lrg.vec(a.mean(0))), M, N_COLS)
    eta = 1.0 / np.linalg.eigvalsh(s)[-1]
    return dict(prob=prob, a=a, b=b, c=c, w_star=w_star, eta=eta, loss=lambda w: np.mean(
        [0.5 * np.trace(w.T @ bi @ w @ ci) - np.trace(ai.T @ w) for ai, bi, ci in zip(a, b, c)]))


def test_projected_gradient_contracts_at_rate_one_minus_eta_kappa(problem):
    p = np.linalg.svd(problem["a"].mean(0))[0][:, :RANK]  # G_0 at W_0 = 0
    kappa = np.mean([np.linalg.eigvalsh(p.T @ bi @ p)[0] * np.linalg.eigvalsh(ci)[0]
                     for bi, ci in zip(problem["b"], problem["c"])])
    assert kappa > 0
    _, log = lrg.projected_sgd(jnp.zeros((M, N_COLS)), problem["prob"], rank=RANK,
                               lr=problem["eta"], steps=STEPS, update_proj_gap=10**9)
    np.testing.assert_allclose(log.kappa, kappa, rtol=1e-4)
    r = np.asarray(log.r_norm, np.float64)
    rate = 1.0 - problem["eta"] * kappa
    assert np.all(r[1:] <= rate * r[:-1] * (1 + 1e-4) + 1e-5)
    assert r[100] < 1e-2 * r[0]


def test_fixed_subspace_stalls_and_refreshing_reaches_the_optimum(problem):
    eta, loss = problem["eta"], problem["loss"]
    p = np.linalg.svd(problem["a"].mean(0))[0][:, :RANK]
    # best loss reachable from W_0 = 0 inside span(P): W = P X
    s_red = np.mean([np.kron(ci, p.T @ bi @ p) for bi, ci in zip(problem["b"], problem["c"])], 0)
    x = lrg.unvec(np.linalg.solve(s_red, lrg.vec(p.T @ problem["a"].mean(0))), RANK, N_COLS)
    stalled, best = loss(p @ x), loss(problem["w_star"])
    w_fixed, log_fixed = lrg.projected_sgd(jnp.zeros((M, N_COLS)), problem["prob"], rank=RANK,
                                           lr=eta, steps=STEPS, update_proj_gap=10**9)
    w_ref, log_ref = lrg.projected_sgd(jnp.zeros((M, N_COLS)), problem["prob"], rank=RANK,
                                       lr=eta, steps=STEPS, update_proj_gap=20)
    np.testing.assert_allclose(log_fixed.loss[-1], stalled, rtol=1e-4)
    assert stalled - best > 0.2 * abs(best)
    np.testing.assert_allclose(log_ref.loss[-1], best, rtol=1e-3)
    assert np.all(np.diff(np.asarray(log_ref.loss)) <= 1e-4 * abs(best))


@pytest.mark.parametrize("gap", [10**9, 20])
def test_lorank_galore_matches_projected_sgd(problem, gap):
    """lorank.optim's scale_by_galore with an identity inner step is projected SGD."""
    eta, prob = problem["eta"], problem["prob"]
    tx = optax.chain(scale_by_galore(RANK, update_proj_gap=gap, scale=1.0, proj_type="left",
                                     inner=optax.identity()), optax.scale(-eta))

    @jax.jit
    def run(w):
        def step(carry, _):
            w, state = carry
            grads = -lrg.lsq_grad(w, prob)  # gradient of phi
            updates, state = tx.update(grads, state, w)
            return (optax.apply_updates(w, updates), state), lrg.lsq_loss(w, prob)

        (w, _), losses = jax.lax.scan(step, (w, tx.init(w)), None, length=STEPS)
        return w, losses

    w_opt, losses = run(jnp.zeros((M, N_COLS)))
    w_ref, log = lrg.projected_sgd(jnp.zeros((M, N_COLS)), prob, rank=RANK, lr=eta, steps=STEPS,
                                   update_proj_gap=gap)
    np.testing.assert_allclose(losses, log.loss[:-1], rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(w_opt, w_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), r"rank=0 must be in \[1, 12\]"),
    (dict(rank=3, lr=-1.0), "lr > 0"),
    (dict(rank=3, update_proj_gap=0), "update_proj_gap >= 1"),
])
def test_bad_input(problem, kwargs, match):
    args = dict(lr=0.1, steps=5, update_proj_gap=5) | kwargs
    with pytest.raises(ValueError, match=match):
        lrg.projected_sgd(jnp.zeros((M, N_COLS)), problem["prob"], **args)
