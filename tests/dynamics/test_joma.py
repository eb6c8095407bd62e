"""JoMA: the block, Theorem 1 along real training, the ODEs of Theorems 2-4 and of K > 1 nodes.

References are NumPy float64 and closed forms (scipy.special for erf), never the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from lorank.data import synthetic
from lorank.dynamics import joma

KEY = jax.random.key(0)


def small_data(num_classes=6, distinct=4, common=3, seed=0):
    x, labels = synthetic.joma_toy(num_classes, distinct, common, seed=seed)
    return joma.make_data(x, labels)


# ----- bad input ----------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error_before_compute():
    model = joma.Model()
    with pytest.raises(ValueError, match="K must be an integer >= 1, got 0"):
        joma.init_params(KEY, 5, 8, 0, 3, model._replace(classifier="linear"))
    with pytest.raises(ValueError, match="attention must be one of .*got 'cosine'"):
        joma.check_model(model._replace(attention="cosine"))
    with pytest.raises(ValueError, match="activation must be one of"):
        joma.check_model(model._replace(activation="swish"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0.0"):
        joma.check_model(model._replace(temperature=0.0))
    with pytest.raises(ValueError, match="identity classifier needs K = num_classes"):
        joma.init_params(KEY, 5, 8, 4, 3, model)
    with pytest.raises(ValueError, match="d must be an integer >= 6"):
        joma.embeddings(5, 5)
    with pytest.raises(ValueError, match="record_every=3 must divide steps=10"):
        joma.check_run(joma.RunConfig(10, record_every=3))
    with pytest.raises(ValueError, match="only for attention 'linear' or 'exp'"):
        joma.discrete_residual(None, model, 1.0)
    with pytest.raises(ValueError, match="node_exponent must be one of"):
        joma.simulate_nodes(np.zeros((1, 3, 2)), joma.ode_args(np.ones((3, 2))), 1.0, node_exponent="max")
    with pytest.raises(ValueError, match=r"Delta must be \[M, K\] with K >= 1"):
        joma.simulate_nodes(np.zeros((1, 3, 0)), joma.ode_args(np.ones((3, 0))), 1.0)
    with pytest.raises(ValueError, match="xbar must be"):
        joma.ode_args(np.ones(3), xbar=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="x must be non-negative"):
        joma.make_data(-np.ones((2, 3)), [0, 1])
    data = small_data()
    u = joma.embeddings(7, 9)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        params = joma.init_params(KEY, 7, 9, 3, 2, model._replace(classifier="linear"))
        joma.train(params, u, data, model._replace(classifier="linear"), joma.RunConfig(2), 0.1, 0.1)
    with pytest.raises(ValueError, match="eta_z must be a finite number > 0"):
        params = joma.init_params(KEY, 7, 9, 6, 6, model)
        joma.train(params, u, data, model, joma.RunConfig(2), 0.0, 0.1)


# ----- the block against NumPy --------------------------------------------------------------------

def numpy_forward(z, w, c, u, x, attention, temperature, activation, classifier):
    """The model of the module docstring, written out in float64."""
    s = z / temperature
    if attention == "linear":
        b = x * s
    elif attention == "exp":
        b = x * np.exp(s)
    else:
        e = x * np.exp(s - s.max())
        b = e / e.sum(1, keepdims=True)
    m = x.shape[1]
    f = b @ u[:, :m].T + u[:, m]
    pre = f @ w
    h = {"linear": pre, "tanh": np.tanh(pre), "relu": np.maximum(pre, 0)}[activation]
    return (h if classifier == "identity" else h @ c), b


@pytest.mark.parametrize("attention", joma.ATTENTIONS)
def test_forward_and_loss_match_numpy(attention):
    data = small_data()
    x, labels = np.asarray(data.x, np.float64), np.asarray(data.labels)
    u = joma.embeddings(7, 10, jax.random.key(1))
    un = np.asarray(u, np.float64)
    np.testing.assert_allclose(un.T @ un, np.eye(8), atol=1e-6)  # orthonormal, u_q orthogonal to U_C
    for activation, classifier, k in (("tanh", "linear", 4), ("linear", "identity", 6)):
        model = joma.Model(attention, 0.7, activation, classifier)
        p = joma.init_params(jax.random.key(2), 7, 10, k, 6, model, scale=0.5)
        logits, _, b = joma.forward(p, u, data.x, model)
        ref_logits, ref_b = numpy_forward(*(np.asarray(a, np.float64) for a in p), un, x, attention, 0.7, activation,
                                          classifier)
        np.testing.assert_allclose(b, ref_b, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(logits, ref_logits, rtol=2e-5, atol=1e-5)
        logp = ref_logits - ref_logits.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        np.testing.assert_allclose(joma.loss(p, u, data, model), -logp[np.arange(6), labels].mean(), rtol=1e-5)
        # V = U_C^T W: the contextual part of each node's weights
        np.testing.assert_allclose(joma.contextual_weights(p.w, u), un[:, :7].T @ np.asarray(p.w), atol=1e-6)


# ----- Theorem 1 ----------------------------------------------------------------------------------

def test_theorem1_exp_attention_is_exact_along_the_gradient_flow():
    """Equal rates: z(t) - z(0) = (sum_k v_k(t)^2 - v_k(0)^2) / (2T) to solver tolerance, for a nonlinear
    phi and a trained classifier (the theorem needs neither linearity nor a fixed top layer)."""
    data = small_data()
    model = joma.Model("exp", 0.5, "tanh", "linear")
    u = joma.embeddings(7, 10, jax.random.key(1))
    p0 = joma.init_params(jax.random.key(3), 7, 10, 4, 6, model, scale=0.3)
    traj = joma.flow(p0, u, data, model, 100.0, 0.5, 0.5, num_saves=11, rtol=1e-7, atol=1e-9)
    z = np.asarray(traj.ys.z, np.float64)
    v = np.einsum("dm,tdk->tmk", np.asarray(u, np.float64)[:, :7], np.asarray(traj.ys.w, np.float64))
    ref = z[0] + ((v**2).sum(-1) - (v[0] ** 2).sum(-1)) / (2 * 0.5)
    assert np.abs(z[-1] - z[0]).max() > 0.5  # z really moved
    np.testing.assert_allclose(z, ref, atol=2e-5)
    pred = joma.predicted_z(traj.ys.z[0], v[0], v, model, joma.rate_ratio(0.5, 0.5))
    np.testing.assert_allclose(pred.value, z, atol=2e-5)


@pytest.mark.parametrize("attention", ["exp", "linear"])
def test_theorem1_holds_exactly_step_by_step_under_sgd(attention):
    """Plain SGD with eta_z / eta_w = 2 and T = 0.5: the discrete identity (Theorem 1 plus the per-step
    squares) holds to float rounding, while dropping the squares leaves an O(eta) gap."""
    data = small_data()
    model = joma.Model(attention, 0.5, "tanh", "linear")
    u = joma.embeddings(7, 10, jax.random.key(1))
    p0 = joma.init_params(jax.random.key(3), 7, 10, 4, 6, model, scale=0.3)
    _, rec = joma.train(p0, u, data, model, joma.RunConfig(400, record_every=20), 0.4, 0.2)
    z, v = np.asarray(rec.z, np.float64), np.asarray(rec.v, np.float64)
    sq_v = (v**2).sum(-1) - (v[0] ** 2).sum(-1) - np.asarray(rec.sum_sq_dv, np.float64)
    if attention == "exp":
        ref = z - z[0] - 2.0 / (2 * 0.5) * sq_v
        lhs = z - z[0]
    else:
        ref = z**2 - z[0] ** 2 - np.asarray(rec.sum_sq_dz, np.float64) - 2.0 * sq_v
        lhs = z**2 - z[0] ** 2
    assert np.abs(lhs[-1]).max() > 0.1
    np.testing.assert_allclose(ref, 0.0, atol=5e-5)
    np.testing.assert_allclose(joma.discrete_residual(rec, model, 2.0), ref, atol=5e-5)
    pred = np.asarray(joma.predicted_z(rec.z[0], rec.v[0], rec.v, model, 2.0).value)
    gap = np.abs(pred - joma.theorem1_lhs(z, model))
    assert gap.max() > 20 * np.abs(ref).max()  # the per-step squares are what makes it exact


@pytest.fixture(scope="module")
def toy_run():
    """The paper's toy: 20 contextual tokens, 20 classes, d = 30, U = [I; 0], softmax with T = 0.5 (the public
    code), SGD lr 0.1 on z and W, 2,000 full-batch steps, init N(0, 0.01^2)."""
    x, labels = synthetic.joma_toy()
    data = joma.make_data(x, labels)
    model = joma.Model("softmax", 0.5, "linear", "identity")
    u = joma.embeddings(20, 30)
    p0 = joma.init_params(KEY, 20, 30, 20, 20, model, scale=0.01)
    _, rec = joma.train(p0, u, data, model, joma.RunConfig(2000, record_every=20), 0.1, 0.1)
    return x, model, rec


def test_theorem1_softmax_correlation_above_099_throughout_the_toy(toy_run):
    x, model, rec = toy_run
    z, v = np.asarray(rec.z, np.float64), np.asarray(rec.v, np.float64)
    # b_bar = E[b] at t = 0, in float64
    s = z[0] / 0.5
    e = x * np.exp(s - s.max())
    b_bar = (e / e.sum(1, keepdims=True)).mean(0)
    term1 = (v**2).sum(-1) / (2 * 0.5)
    term2 = -(v**2).sum((-2, -1))[:, None] * b_bar / (2 * 0.5)
    z_hat = term1 + term2 + (z[0] - term1[0] - term2[0])
    pred = joma.predicted_z(rec.z[0], rec.v[0], rec.v, model, 1.0, joma.mean_attention(rec.z[0], joma.make_data(
        x, np.arange(20)), model))
    np.testing.assert_allclose(pred.value, z_hat, atol=1e-5)
    corr = np.array([np.corrcoef(z[t], z_hat[t])[0, 1] for t in range(1, len(z))])
    corr1 = np.corrcoef(z[-1], term1[-1])[0, 1]
    assert np.abs(z[-1] - z[0]).max() > 1.0  # the attention learned something
    assert corr.min() > 0.99, corr.min()
    assert corr[-1] > corr1  # the second term, -||V||^2 b_bar / (2T), improves on sum_k v_k^2 / (2T) alone
    np.testing.assert_allclose(joma.pearson(rec.z[1:], pred.value[1:]), corr, atol=1e-4)


def test_softmax_exact_term_is_the_b_bt_term_of_sgd():
    """SGD written out in NumPy float64 (hand-derived gradients): the record follows it, and
    `softmax_exact_term` equals the accumulated eta_z / T sum_n w_n b_n (b_n . g_b,n) that Theorem 1 replaces by
    -||V||^2 b_bar / (2T)."""
    data = small_data()
    x, y, wt = (np.asarray(a, np.float64) for a in data)
    y = y.astype(int)
    temperature, eta_z, eta_w, steps = 0.5, 0.6, 0.3, 40
    model = joma.Model("softmax", temperature, "linear", "identity")
    u = joma.embeddings(7, 9, jax.random.key(1))
    p0 = joma.init_params(jax.random.key(5), 7, 9, 6, 6, model, scale=0.3)
    _, rec = joma.train(p0, u, data, model, joma.RunConfig(steps), eta_z, eta_w)
    un = np.asarray(u, np.float64)
    uc, uq = un[:, :7], un[:, 7]
    z, w = np.asarray(p0.z, np.float64), np.asarray(p0.w, np.float64)
    acc = np.zeros(7)
    for step in range(steps):
        e = x * np.exp((z - z.max()) / temperature)
        b = e / e.sum(1, keepdims=True)
        f = b @ uc.T + uq
        h = f @ w
        prob = np.exp(h - h.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        g_h = wt[:, None] * (prob - np.eye(6)[y])
        g_b = g_h @ w.T @ uc
        bg = (b * g_b).sum(1, keepdims=True)
        acc += eta_z / temperature * (b * bg).sum(0)
        z, w = z - eta_z / temperature * (b * g_b - b * bg).sum(0), w - eta_w * f.T @ g_h
        np.testing.assert_allclose(rec.z[step + 1], z, atol=2e-5)
    np.testing.assert_allclose(joma.softmax_exact_term(rec, model, eta_z / eta_w)[-1], acc, atol=5e-5)
    assert np.abs(acc).max() > 0.05


def test_stable_rank_of_v_falls_in_the_toy_run(toy_run):
    _, _, rec = toy_run
    v = np.asarray(rec.v, np.float64)
    s = np.linalg.svd(v, compute_uv=False)
    ranks = (s**2).sum(-1) / s[:, 0] ** 2
    np.testing.assert_allclose(joma.node_stable_rank(rec.v), ranks, rtol=1e-4)
    assert ranks[0] > 3.0 and ranks[-1] < 1.2


# ----- Theorem 2: linear activation ---------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_ode():
    rng = np.random.default_rng(0)
    m = 8
    delta = rng.normal(size=m) * 0.5
    xbar = rng.uniform(0.5, 1.5, m)
    v0 = np.stack([np.zeros(m), 0.2 * rng.normal(size=m)])
    args = joma.ode_args(delta, xbar, 2.0, True)
    traj = joma.simulate_linear(v0, args, 2000.0, num_saves=61, log_times=True)
    return delta, xbar, v0, args, traj


def test_theorem2_conserved_quantity_to_solver_tolerance(linear_ode):
    delta, _, _, _, traj = linear_ode
    v, tau = np.asarray(traj.ys[0], np.float64), np.asarray(traj.ys[1], np.float64)
    finite = np.abs(v) < 8.0  # where erf(v / sqrt(2)) is still resolved in float
    inv = special.erf(v / np.sqrt(2.0)) / delta
    moved = inv - inv[:, :1]
    clock = np.sqrt(2.0 / np.pi) * (tau - tau[:, :1])
    want = np.broadcast_to(clock[..., None], moved.shape)
    np.testing.assert_allclose(np.where(finite, moved, want), want, atol=1e-5)
    assert clock.max() > 1.0


def test_theorem2_only_the_most_salient_token_grows_and_attention_becomes_sparse(linear_ode):
    delta, xbar, v0, args, traj = linear_ode
    v = np.asarray(traj.ys[0], np.float64)
    for b in range(2):
        e0 = special.erf(v0[b] / np.sqrt(2.0))
        tau_blow = np.sqrt(np.pi / 2) * (np.sign(delta) - e0) / delta
        star = int(np.argmin(tau_blow))
        limit = np.sqrt(2.0) * special.erfinv(e0 + delta / delta[star] * (np.sign(delta[star]) - e0[star]))
        others = np.arange(len(delta)) != star
        assert abs(v[b, -1, star]) > 30.0 and np.sign(v[b, -1, star]) == np.sign(delta[star])
        np.testing.assert_allclose(v[b, -1, others], limit[others], atol=2e-4)
        got_star, got_limit, _ = joma.linear_limit(v0[b], delta)
        assert got_star == star
        np.testing.assert_allclose(got_limit[others], limit[others], atol=1e-9)
    assert int(np.argmax(np.abs(delta))) == joma.linear_limit(v0[0], delta)[0]  # from v = 0: the largest |Delta|
    p = np.asarray(joma.ode_attention(jnp.asarray(v), args), np.float64)
    logits = np.log(xbar) + v**2 / 2.0
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(p[:, :10], (ref / ref.sum(-1, keepdims=True))[:, :10], rtol=1e-4, atol=1e-7)
    entropy = np.asarray(joma.attention_entropy(jnp.asarray(p)))
    assert entropy[0, 0] > 1.9 and entropy[0, -1] < 1e-3  # dense -> one token


def test_theorem2_without_normalization_matches_the_closed_form():
    """A = 1: v(t) = sqrt(2) erfinv(erf(v0 / sqrt(2)) + sqrt(2 / pi) Delta t), up to the blow-up."""
    delta = np.array([0.3, -0.2, 0.1, 0.05, -0.12, 0.08, 0.15, -0.01])  # shapes of the fixture: one program
    v0 = np.array([[0.1, 0.0, -0.3, 0.2, 0.0, 0.1, -0.1, 0.3], np.zeros(8)])
    t_blow = np.sqrt(np.pi / 2) * (1.0 - special.erf(0.1 / np.sqrt(2))) / 0.3
    traj = joma.simulate_linear(v0, joma.ode_args(delta, None, 2.0, False), 0.98 * t_blow, num_saves=61)
    t = np.asarray(traj.ts, np.float64)[:, None]
    for b in range(2):
        ref = np.sqrt(2) * special.erfinv(special.erf(v0[b] / np.sqrt(2)) + np.sqrt(2 / np.pi) * delta * t)
        np.testing.assert_allclose(traj.ys[0][b], ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(traj.ys[1][b], t[:, 0], rtol=1e-6)  # tau = t when A = 1
    assert np.abs(traj.ys[0][0, -1, 0]) > 2.0  # close to the blow-up


# ----- Theorems 3-4: nonlinear activation ---------------------------------------------------------

def test_theorems3_4_rates_in_the_ratio_exp_mu_squared_over_2():
    mu = np.linspace(1.0, 2.0, 10)  # the shapes of the next test: one compiled program
    traj = joma.simulate_nonlinear(np.full((1, 10), 0.05), joma.ode_args(mu, None, 2.0, True), 3000.0,
                                   num_saves=401, log_times=True)
    v, tau = np.asarray(traj.ys[0][0], np.float64), np.asarray(traj.ys[1][0], np.float64)
    np.testing.assert_allclose(v[-1], mu, rtol=1e-5)
    rates = joma.fit_rates(tau, v, mu, window=(1e-5, 1e-3))
    ratio = rates[:, None] / rates[None, :]
    ref = np.exp(mu[:, None] ** 2 / 2) / np.exp(mu[None, :] ** 2 / 2)
    np.testing.assert_allclose(ratio, ref, rtol=0.02)
    np.testing.assert_allclose(rates, np.exp(mu**2 / 2), rtol=0.02)  # in the clock tau, each on its own
    # in t, once every token is near mu: exp(mu_j^2 / 2) / A(mu)
    late = joma.fit_rates(np.asarray(traj.ts), v, mu, window=(1e-5, 1e-3))
    np.testing.assert_allclose(late[:5], (np.exp(mu**2 / 2) / np.exp(mu**2 / 2).sum())[:5], rtol=0.01)


def test_theorems3_4_entropy_falls_then_bounces_back():
    """The public code's Fig. 4 setting: mu = sorted(1 + 3 U(0, 1)), v(0) = 0.05, softmax(v^2 / 3)."""
    mu = np.sort(1.0 + 3.0 * np.random.default_rng(0).uniform(size=10))
    args = joma.ode_args(mu, None, 3.0, True)
    traj = joma.simulate_nonlinear(np.full((1, 10), 0.05), args, 100.0, num_saves=401)
    v = np.asarray(traj.ys[0][0], np.float64)
    p = np.exp(v**2 / 3 - (v**2 / 3).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(joma.attention_entropy(joma.ode_attention(jnp.asarray(v), args)), entropy, atol=1e-5)
    low = int(np.argmin(entropy))
    assert 0 < low < len(entropy) - 1
    assert entropy[0] - entropy[low] > 0.5 and entropy[-1] - entropy[low] > 0.2  # sparse, then dense again
    out = joma.bounce(entropy)
    assert out["argmin"] == low and out["rise"] == pytest.approx(entropy[-1] - entropy[low])


# ----- K > 1 nodes --------------------------------------------------------------------------------

def test_k_nodes_from_zero_reduce_to_theorem2_and_the_stable_rank_falls():
    """From V(0) = 0, row l of V stays s_l(t) Delta_l and u_l = s_l ||Delta_l|| follows Theorem 2's ODE with
    Delta_l -> ||Delta_l||; the stable rank of V falls from sr(Delta) to 1."""
    rng = np.random.default_rng(1)
    m, k = 8, 4
    delta = rng.normal(size=(m, k)) * 0.3
    xbar = rng.uniform(0.5, 1.5, m)
    v0 = np.concatenate([np.zeros((1, m, k)), 0.05 * rng.normal(size=(2, m, k))])
    traj = joma.simulate_nodes(v0, joma.ode_args(delta, xbar, 2.0, True), 3000.0, num_saves=61, log_times=True)
    v = np.asarray(traj.ys, np.float64)
    norms = np.linalg.norm(delta, axis=1)
    u = v[0] @ delta.T / norms  # [T, M, M]: projections of each row on each Delta row
    u = np.einsum("tll->tl", u)
    np.testing.assert_allclose(v[0] / (1 + np.abs(v[0])), u[..., None] * (delta / norms[:, None]) / (1 + np.abs(v[0])),
                               atol=1e-5)
    lin = joma.simulate_linear(np.zeros((2, m)), joma.ode_args(norms, xbar, 2.0, True), 3000.0, num_saves=61,
                               log_times=True)
    ok = np.abs(u) < 8
    np.testing.assert_allclose(np.where(ok, u, 0), np.where(ok, lin.ys[0][0], 0), rtol=1e-4, atol=1e-5)
    s = np.linalg.svd(v, compute_uv=False)
    ranks = (s**2).sum(-1) / np.maximum(s[..., 0] ** 2, 1e-300)
    np.testing.assert_allclose(joma.node_stable_rank(jnp.asarray(v[:, 1:])), ranks[:, 1:], rtol=1e-4)
    s_delta = np.linalg.svd(delta, compute_uv=False)
    assert ranks[0, 1] == pytest.approx((s_delta**2).sum() / s_delta[0] ** 2, rel=1e-3)
    assert np.all(np.diff(ranks[0, 1:]) <= 1e-4)  # from zero: never rises
    assert np.all(ranks[:, -1] < 1.01) and np.all(ranks[1:, 0] > 1.5)  # every start ends at rank one
    assert np.argmax(np.abs(v[0, -1]).max(1)) == np.argmax(norms)  # the row with the largest ||Delta_l|| wins
