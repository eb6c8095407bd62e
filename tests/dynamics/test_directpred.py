"""Non-contrastive SSL dynamics (Tian, Chen, Ganguli, ICML 2021) and DirectPred / DirectCopy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lorank.dynamics import directpred as dp


def _spd(rng, d, floor=0.1):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + floor * np.eye(d)


# ----- the fields are the gradient flow of the paper's loss -------------------------------------

def test_byol_field_is_the_stop_gradient_flow_of_the_expected_loss():
    rng = np.random.default_rng(0)
    d_in, d_out = 5, 3
    x, xp = _spd(rng, d_in), _spd(rng, d_in, 0.0)
    w, w_p, w_a = rng.normal(size=(d_out, d_in)), rng.normal(size=(d_out, d_out)), rng.normal(size=(d_out, d_in))
    alpha_p, eta, beta = 0.7, 0.03, 0.4
    args = dp.ByolArgs(jnp.asarray(x), jnp.asarray(xp), alpha_p, eta, beta)
    vel = dp.byol_field(0.0, dp.ByolState(*map(jnp.asarray, (w, w_p, w_a))), args)

    def loss(w, w_p):
        return dp.expected_loss(w_p @ w, jax.lax.stop_gradient(jnp.asarray(w_a)), args.x_cov, args.x_prime_cov)

    g_w, g_p = jax.grad(loss, argnums=(0, 1))(jnp.asarray(w), jnp.asarray(w_p))
    np.testing.assert_allclose(vel.w, -g_w - eta * w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vel.w_p, -alpha_p * g_p - eta * w_p, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vel.w_a, beta * (w - w_a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["no_predictor", "no_stop_gradient"])
def test_collapse_fields_are_gradient_flows_and_their_kronecker_forms(variant):
    rng = np.random.default_rng(1)
    d_in, d_out, eta = 4, 3, 0.05
    x, xp = _spd(rng, d_in), _spd(rng, d_in, 0.0)
    w_p = rng.normal(size=(d_out, d_out)) if variant == "no_stop_gradient" else None
    args = dp.collapse_args(x, xp, d_out=d_out, variant=variant, w_p=w_p, eta=eta)
    w = jnp.asarray(rng.normal(size=(d_out, d_in)))
    vel = dp.collapse_field(0.0, w, args)
    if variant == "no_predictor":  # SimSiam without a predictor: target = sg(W), predictor I
        grad = jax.grad(lambda v: dp.expected_loss(v, jax.lax.stop_gradient(w), args.x_cov, args.x_prime_cov))(w)
        np.testing.assert_allclose(vel, -(w @ xp) - eta * w, rtol=1e-5, atol=1e-5)
    else:  # gradients through both branches, W_a = W
        grad = jax.grad(lambda v: dp.expected_loss(jnp.asarray(w_p) @ v, v, args.x_cov, args.x_prime_cov))(w)
        ident = dp.collapse_field(0.0, w, dp.collapse_args(x, xp, d_out=d_out, variant=variant, eta=eta))
        np.testing.assert_allclose(ident, -w @ (2 * xp) - eta * w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vel, -grad - eta * w, rtol=1e-4, atol=1e-4)
    h = np.asarray(dp.collapse_generator(args), np.float64)
    np.testing.assert_allclose(dp.vec(vel), -h @ np.asarray(dp.vec(w)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp.unvec(dp.vec(w), d_out), w)
    np.testing.assert_allclose(h, h.T, atol=1e-5)
    assert np.linalg.eigvalsh(h).min() >= eta - 1e-5
    expm = scipy.linalg.expm(-3.0 * h) @ np.asarray(dp.vec(w), np.float64)
    np.testing.assert_allclose(dp.collapse_closed_form(w, jnp.array([3.0]), args)[0], dp.unvec(expm, d_out),
                               rtol=1e-4, atol=1e-5)


def test_collapsing_variants_decay_to_zero_from_random_starts_as_the_closed_form():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        d_in, d_out, eta, t1 = 4, 3, 0.02, 400.0
        x, xp = _spd(rng, d_in), _spd(rng, d_in, 0.0)
        w0 = jnp.asarray(rng.normal(size=(8, d_out, d_in)))
        for variant, w_p in (("no_predictor", None), ("no_stop_gradient", None),
                             ("no_stop_gradient", 0.5 * rng.normal(size=(d_out, d_out)))):
            args = dp.collapse_args(x, xp, d_out=d_out, variant=variant, w_p=w_p, eta=eta)
            traj = dp.simulate_collapse(w0, args, t1, num_saves=9)  # one program for every variant
            h = np.asarray(dp.collapse_generator(args))
            vecs = np.asarray(w0).transpose(0, 2, 1).reshape(len(w0), -1)  # column-major vec of each start
            closed = np.stack([vecs @ scipy.linalg.expm(-t * h).T for t in np.asarray(traj.ts)], axis=1)
            closed = closed.reshape(len(w0), len(traj.ts), d_in, d_out).transpose(0, 1, 3, 2)  # SciPy's expm
            np.testing.assert_allclose(traj.ys, closed, atol=1e-7, err_msg=variant)
            norms = np.linalg.norm(np.asarray(traj.ys), axis=(-2, -1))
            assert np.all(np.diff(norms, axis=1) <= 1e-8)  # H is PSD: ||W|| never grows (up to solver tolerance)
            assert (norms[:, -1] / norms[:, 0]).max() < np.exp(-eta * t1) * 1.01
        with pytest.raises(ValueError, match="variant"):
            dp.collapse_args(x, xp, d_out=d_out, variant="byol")


# ----- eigenvalue dynamics ----------------------------------------------------------------------

def _aligned_start(rng, d, p, s, tau):
    """W_p = U diag(p) U^T, W = U diag(sqrt s) V^T, W_a = diag(tau) W in U's basis."""
    u = np.linalg.qr(rng.normal(size=(d, d)))[0]
    v = np.linalg.qr(rng.normal(size=(d, d)))[0]
    w = u @ np.diag(np.sqrt(s)) @ v.T
    return dp.ByolState(jnp.asarray(w), jnp.asarray(u @ np.diag(p) @ u.T), jnp.asarray(u @ np.diag(tau) @ u.T @ w))


def test_eigen_fields_are_the_full_matrix_dynamics_on_the_aligned_set():
    """At an aligned state, Lemma 1's matrix velocities stay aligned and their eigen-components are
    `eigen_field` and `amplitude_field` (so trajectories agree: the aligned set is invariant)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        d, alpha_p, eta, sigma2, beta = 4, 1.5, 0.04, 0.3, 0.7
        p, s, tau = np.array([0.05, 0.3, 0.6, 0.9]), np.array([0.02, 0.5, 0.2, 1.2]), np.array([1.0, 0.8, 1.2, 1.0])
        y = _aligned_start(rng, d, p, s, tau)
        vel = dp.byol_field(0.0, y, dp.ByolArgs(jnp.eye(d), sigma2 * jnp.eye(d), alpha_p, eta, beta))
        w, w_p, w_a = (np.asarray(v) for v in y)
        dw, dw_p, dw_a = (np.asarray(v) for v in vel)
        u = np.linalg.eigh(w @ w.T)[1]
        order = np.argsort(s)
        rot = lambda m: u.T @ m @ u  # noqa: E731
        d_f = dw @ w.T + w @ dw.T
        d_cross = dw_a @ w.T + w_a @ dw.T
        for m in (d_f, dw_p, d_cross):  # velocities keep the shared eigenbasis
            assert np.abs(rot(m) - np.diag(np.diag(rot(m)))).max() < 1e-12
        ds = np.diag(rot(d_f))
        dtau = (np.diag(rot(d_cross)) - tau[order] * ds) / s[order]
        args = dp.eigen_args(alpha_p=alpha_p, eta=eta, sigma2=sigma2, beta=beta)
        want = dp.eigen_field(0.0, dp.EigenState(*map(jnp.asarray, (p, s, tau))), args)
        np.testing.assert_allclose(np.diag(rot(dw_p)), np.asarray(want.p)[order], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ds, np.asarray(want.s)[order], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dtau, np.asarray(want.tau)[order], rtol=1e-10, atol=1e-12)
        amp = dp.amplitude_field(0.0, dp.AmplitudeState(*map(jnp.asarray, (p, np.sqrt(s), tau * np.sqrt(s)))), args)
        np.testing.assert_allclose(amp.p, want.p, rtol=1e-10)
        np.testing.assert_allclose(2 * np.sqrt(s) * np.asarray(amp.w), want.s, rtol=1e-10)  # d(w^2) = 2 w dw
        d_tau_amp = (np.asarray(amp.a) - tau * np.asarray(amp.w)) / np.sqrt(s)  # d(a / w)
        np.testing.assert_allclose(d_tau_amp, want.tau, rtol=1e-10, atol=1e-12)
        fixed = dp.eigen_field(0.0, dp.EigenState(*map(jnp.asarray, (p, s, tau))), args._replace(ema=0.0))
        assert np.all(np.asarray(fixed.tau) == 0.0)


def test_invariance_holds_along_a_thousand_vmapped_trajectories():
    with jax.enable_x64(True):
        key = jax.random.key(4)
        k1, k2, k3 = jax.random.split(key, 3)
        b, d = 1000, 2
        y0 = dp.EigenState(jax.random.uniform(k1, (b, d), minval=-0.2, maxval=1.0),
                           jax.random.uniform(k2, (b, d), maxval=1.5), 0.5 + jax.random.uniform(k3, (b, d)))
        args = dp.eigen_args(alpha_p=2.0, eta=0.05, sigma2=0.2, beta=0.5)
        traj = dp.simulate_eigen(y0, args, 40.0, num_saves=21)
        assert traj.ys.s.shape == (b, 21, d)
        res = np.asarray(dp.invariant_residual(traj.ts, traj.ys, args))
        assert res.max() < 1e-7
        change = np.abs(np.asarray(traj.ys.s[:, -1] - traj.ys.s[:, 0])).max()
        assert change > 0.1  # the trajectories moved


# ----- the 1-D reduced dynamics -----------------------------------------------------------------

def test_fixed_points_are_the_roots_and_their_stability():
    tau, eta, sigma2 = 1.0, 0.05, 0.5
    fp = dp.fixed_points(tau, eta, sigma2)
    args = dp.reduced_args(tau=tau, eta=eta, sigma2=sigma2)
    roots = np.sort(np.roots([-(1 + sigma2), tau, -eta]).real)
    np.testing.assert_allclose([fp.minus, fp.plus], roots, rtol=1e-12)
    for p in (0.0, float(fp.minus), float(fp.plus)):
        assert abs(float(dp.reduced_field(0.0, p, args))) < 1e-12
    assert dp.reduced_slope(0.0, args) < 0 < dp.reduced_slope(fp.minus, args)
    assert dp.reduced_slope(fp.plus, args) < 0
    # p*_- ~ eta / tau for small eta
    for tau_, eta_ in ((1.0, 1e-3), (0.5, 1e-3), (2.0, 1e-2)):
        assert abs(dp.fixed_points(tau_, eta_, 0.3).minus / (eta_ / tau_) - 1) < 0.02
    # existence: tau^2 >= 4 eta (1 + sigma^2)
    edge = tau**2 / (4 * (1 + sigma2))
    assert bool(dp.fixed_points(tau, edge * 0.999, sigma2).exists)
    beyond = dp.fixed_points(tau, edge * 1.001, sigma2)
    assert not bool(beyond.exists) and np.isnan(beyond.minus)


def test_starts_around_the_threshold_go_to_the_predicted_stationary_points():
    with jax.enable_x64(True):
        taus, etas, sigma2s = np.array([1.0, 1.0, 0.6]), np.array([0.01, 0.1, 0.02]), np.array([0.0, 0.8, 0.3])
        fp = dp.fixed_points(taus, etas, sigma2s)
        delta = 0.02
        # beyond the existence condition tau^2 >= 4 eta (1 + sigma^2) every start collapses
        eta_beyond = 1.2 / (4 * 1.3)
        beyond = np.linspace(0.05, 2.0, 8)
        p0 = np.concatenate([fp.minus * (1 + delta), fp.minus * (1 - delta), fp.plus * 1.5, beyond])
        args = dp.ReducedArgs(np.concatenate([np.tile(taus, 3), np.ones(8)]),
                              np.concatenate([np.tile(etas, 3), np.full(8, eta_beyond)]),
                              np.concatenate([np.tile(sigma2s, 3), np.full(8, 0.3)]))
        traj = dp.simulate_reduced(jnp.asarray(p0), args, 60.0, num_saves=3, time_unit_eta=True)
        final = np.asarray(traj.ys[:, -1])
        np.testing.assert_allclose(final[:3], fp.plus, rtol=1e-5)  # just above p*_-: to p*_+
        assert np.all(np.abs(final[3:6]) < 1e-6 * fp.minus)  # just below: collapse
        np.testing.assert_allclose(final[6:9], fp.plus, rtol=1e-5)
        assert np.abs(final[9:]).max() < 1e-6


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="alpha_p"):
        dp.eigen_args(alpha_p=0.0)
    with pytest.raises(ValueError, match="eta"):
        dp.eigen_args(eta=-0.1)
    with pytest.raises(ValueError, match="sigma2"):
        dp.reduced_args(sigma2=-1.0)
    with pytest.raises(ValueError, match="tau"):
        dp.reduced_args(tau=0.0)
    with pytest.raises(ValueError, match="target"):
        dp.eigen_args(target="momentum")
    with pytest.raises(ValueError, match="beta"):
        dp.byol_run(lr=0.1, steps=10, batch=4, beta=20.0, record_every=5)
    with pytest.raises(ValueError, match="record_every"):
        dp.byol_run(lr=0.1, steps=10, batch=4, record_every=3)
    with pytest.raises(ValueError, match="y0.s"):
        dp.simulate_eigen(dp.EigenState(*(jnp.full((1, 2), v) for v in (0.1, -1.0, 1.0))), dp.eigen_args(), 1.0)


# ----- DirectPred, DirectCopy, the correlation, alignment ---------------------------------------

def _psd(rng, d, spectrum):
    u = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (u * np.asarray(spectrum, np.float64)) @ u.T


@pytest.mark.parametrize("eps_inside_root", [False, True])
def test_directpred_has_the_stated_spectrum(eps_inside_root):
    with jax.enable_x64(True):  # float64, so that round-off above zero (sqrt-amplified) stays below 1e-7
        _check_directpred_spectrum(eps_inside_root)


def _check_directpred_spectrum(eps_inside_root):
    rng = np.random.default_rng(5)
    eps = 0.05
    # full rank, and rank-deficient with exact zeros and round-off below zero
    for spectrum in ([0.3, 1.0, 2.5, 4.0, 0.7], [0.0, 0.0, 1.0, 3.0, -1e-7]):
        f = _psd(rng, 5, spectrum)
        w_p = np.asarray(dp.directpred_predictor(jnp.asarray(f), eps=eps, eps_inside_root=eps_inside_root),
                         np.float64)
        np.testing.assert_allclose(w_p, w_p.T, atol=1e-12)
        s, u = np.linalg.eigh(f)
        ratio = np.maximum(s, 0) / s.max()
        want = np.sqrt(ratio + eps) if eps_inside_root else np.sqrt(ratio) + eps
        np.testing.assert_allclose(np.linalg.eigvalsh(w_p), np.sort(want), atol=1e-7)
        np.testing.assert_allclose(w_p, (u * want) @ u.T, atol=1e-7)  # the same eigenvectors
        if spectrum[0] == 0.0:
            floor = np.sqrt(eps) if eps_inside_root else eps
            assert np.sum(np.abs(np.linalg.eigvalsh(w_p) - floor) < 1e-7) == 3  # p = eps where s <= 0
    zero = np.asarray(dp.directpred_predictor(jnp.zeros((3, 3)), eps=eps))
    np.testing.assert_allclose(zero, eps * np.eye(3), atol=1e-7)
    with pytest.raises(ValueError, match="eps"):
        dp.directpred_predictor(jnp.eye(3), eps=-0.1)
    with pytest.raises(ValueError, match="f_hat"):
        dp.directpred_predictor(jnp.ones((3, 2)))


def test_directcopy_normalizes_by_the_chosen_norm():
    rng = np.random.default_rng(6)
    f = _psd(rng, 4, [0.5, 1.0, 2.0, 3.0])
    spectral = np.asarray(dp.directcopy_predictor(jnp.asarray(f), eps=0.1))
    np.testing.assert_allclose(spectral, f / 3.0 + 0.1 * np.eye(4), atol=1e-5)
    frob = np.asarray(dp.directcopy_predictor(jnp.asarray(f), eps=0.1, norm="frobenius"))
    np.testing.assert_allclose(frob, f / np.linalg.norm(f) + 0.1 * np.eye(4), atol=1e-5)
    raw = np.asarray(dp.directcopy_predictor(jnp.asarray(f), eps=0.1, normalize=False))
    np.testing.assert_allclose(raw, f + 0.1 * np.eye(4), atol=1e-5)
    with pytest.raises(ValueError, match="eps"):
        dp.directcopy_predictor(jnp.asarray(f), eps=-1.0)
    with pytest.raises(ValueError, match="norm"):
        dp.directcopy_predictor(jnp.asarray(f), norm="nuclear")


def test_update_correlation_against_numpy():
    rng = np.random.default_rng(7)
    f_hat, f1, f2 = _psd(rng, 3, [1.0, 2.0, 0.5]), rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 1.0
    rho = 0.3
    f = np.concatenate([f1, f2])
    got = dp.update_correlation(jnp.asarray(f_hat), jnp.asarray(f1), jnp.asarray(f2), rho)
    np.testing.assert_allclose(got, rho * f_hat + (1 - rho) * f.T @ f / 12, rtol=1e-5, atol=1e-6)
    centered = dp.update_correlation(jnp.asarray(f_hat), jnp.asarray(f1), jnp.asarray(f2), rho, centered=True)
    np.testing.assert_allclose(centered, rho * f_hat + (1 - rho) * np.cov(f.T, bias=True), rtol=1e-5, atol=1e-6)
    jitted = jax.jit(dp.update_correlation)(jnp.asarray(f_hat), jnp.asarray(f1), jnp.asarray(f2), jnp.float32(rho))
    np.testing.assert_allclose(jitted, got, rtol=1e-6)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rho"):
            dp.update_correlation(jnp.asarray(f_hat), jnp.asarray(f1), jnp.asarray(f2), bad)


def test_commutator_alignment():
    rng = np.random.default_rng(8)
    u = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    f = (u * np.array([0.1, 1.0, 2.0, 3.0])) @ u.T
    shared = (u * np.array([0.5, -0.2, 1.0, 0.3])) @ u.T
    assert float(dp.commutator_alignment(jnp.asarray(f), jnp.asarray(shared))) < 1e-6
    other = _psd(rng, 4, [0.5, 1.0, 1.5, 2.0])
    value = float(dp.commutator_alignment(jnp.asarray(f), jnp.asarray(other)))
    assert value > 1e-2
    scaled = float(dp.commutator_alignment(jnp.asarray(7.0 * f), jnp.asarray(0.01 * other)))
    np.testing.assert_allclose(scaled, value, rtol=1e-5)
    direct = np.linalg.norm(f @ other - other @ f) / (np.linalg.norm(f) * np.linalg.norm(other))
    np.testing.assert_allclose(value, direct, rtol=1e-5)
    assert float(dp.commutator_alignment(jnp.zeros((4, 4)), jnp.asarray(other))) == 0.0


# ----- linear BYOL trained by autodiff ----------------------------------------------------------

def test_linear_byol_sgd_follows_the_amplitude_ode_from_an_aligned_start():
    rng = np.random.default_rng(9)
    d, eta, sigma2, beta, alpha_p = 4, 0.05, 0.5, 1.0, 1.0
    p0, s0 = np.array([0.02, 0.3, 0.5, 0.8]), np.array([0.01, 0.4, 0.8, 0.6])
    y0 = _aligned_start(rng, d, p0, s0, np.ones(d))
    y0 = dp.ByolState(*(jnp.asarray(v, jnp.float32) for v in y0))
    run = dp.byol_run(lr=0.02, steps=600, batch=512, alpha_p=alpha_p, eta=eta, sigma2=sigma2, beta=beta,
                      record_every=100)
    _, saved = dp.train_linear_byol(y0, run, jax.random.key(0))
    eig, align = dp.measured_eigen(saved)
    with jax.enable_x64(True):
        start = dp.AmplitudeState(*(jnp.asarray(v)[None] for v in (p0, np.sqrt(s0), np.sqrt(s0))))
        ode = dp.simulate_amplitudes(start, dp.eigen_args(alpha_p=alpha_p, eta=eta, sigma2=sigma2, beta=beta),
                                     run.steps * run.lr, num_saves=7)
    s_ode = np.sort(np.asarray(ode.ys.w[0]) ** 2, axis=1)
    err = np.abs(np.asarray(eig.s) - s_ode).max(1) / s_ode.max(1)
    assert err.max() < 0.05, err
    assert float(align.max()) < 0.05  # SGD noise barely misaligns


def test_the_sampled_loss_averages_to_the_expected_loss():
    rng = np.random.default_rng(10)
    d, sigma2 = 4, 0.5
    w, w_p, w_a = (jnp.asarray(rng.normal(size=(d, d)), jnp.float32) for _ in range(3))
    x, n1, n2 = jax.random.normal(jax.random.key(1), (3, 200_000, d))
    sampled = float(dp.sampled_loss(w, w_p, w_a, x + np.sqrt(sigma2) * n1, x + np.sqrt(sigma2) * n2))
    expected = float(dp.expected_loss(w_p @ w, w_a, jnp.eye(d), sigma2 * jnp.eye(d)))
    assert abs(sampled / expected - 1) < 0.02
