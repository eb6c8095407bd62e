"""The diffrax wrapper: order of convergence against a closed form, vmap, pytrees, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.dynamics.solve import solve, solve_batch

# Damped oscillator y'' + 2 c y' + w^2 y = 0 as a first-order system.
C, W = 0.3, 2.0


def oscillator(t, y, args):
    del t, args
    return jnp.stack([y[1], -2 * C * y[1] - W**2 * y[0]])


def exact(t):
    """Closed form with y(0) = 1, y'(0) = 0 (underdamped)."""
    wd = np.sqrt(W**2 - C**2)
    pos = np.exp(-C * t) * (np.cos(wd * t) + C / wd * np.sin(wd * t))
    vel = -np.exp(-C * t) * (W**2 / wd) * np.sin(wd * t)
    return np.array([pos, vel])


@pytest.mark.parametrize("solver,order,dts", [
    ("euler", 1, (0.02, 0.01, 0.005)),
    ("heun", 2, (0.04, 0.02, 0.01)),
    ("bosh3", 3, (0.1, 0.05, 0.025)),
    ("tsit5", 5, (0.2, 0.1, 0.05)),
])
def test_fixed_step_order_of_convergence(solver, order, dts):
    t1 = 2.0
    with jax.enable_x64(True):
        run = jax.jit(lambda dt: solve(oscillator, jnp.array([1.0, 0.0]), t1, dt0=dt,
                                       adaptive=False, solver=solver).ys[-1])
        errors = [np.linalg.norm(np.asarray(run(jnp.float64(dt))) - exact(t1)) for dt in dts]
    observed = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(observed, order, atol=0.3)


def test_adaptive_meets_tolerance_and_saves_at_ts():
    ts = np.linspace(0.0, 3.0, 7)
    with jax.enable_x64(True):
        traj = solve(oscillator, jnp.array([1.0, 0.0]), 3.0, ts=ts, rtol=1e-9, atol=1e-11)
        ys = np.asarray(traj.ys)
    np.testing.assert_allclose(np.asarray(traj.ts), ts)
    np.testing.assert_allclose(ys, exact(ts).T, atol=1e-7)
    assert int(traj.num_steps) > 0


def test_vmap_over_initial_conditions_matches_single_solves():
    def decay(t, y, k):
        return -k * y

    y0s = jnp.array([[1.0], [2.0], [-0.5]])
    batched = jax.vmap(lambda y: solve(decay, y, 1.0, args=0.7).ys[-1])(y0s)
    np.testing.assert_allclose(np.asarray(batched)[:, 0], np.asarray(y0s)[:, 0] * np.exp(-0.7),
                               rtol=1e-5)


def test_pytree_state():
    def field(t, y, args):
        return {"a": -y["a"], "b": (y["b"][0] * 0 + 1.0, -2.0 * y["b"][1])}

    y0 = {"a": jnp.ones(2), "b": (jnp.zeros(()), jnp.ones(3))}
    out = solve(field, y0, 1.0).ys
    np.testing.assert_allclose(out["a"][-1], np.exp(-1.0), rtol=1e-5)
    np.testing.assert_allclose(out["b"][0][-1], 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["b"][1][-1], np.exp(-2.0), rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(t1=0.0), "t1=0.0 must be greater"),
    (dict(t1=1.0, solver="rk4"), "solver must be one of .* got 'rk4'"),
    (dict(t1=1.0, solver="euler"), "no error estimate"),
    (dict(t1=1.0, rtol=-1e-3), r"rtol must be a finite number > 0, got -0.001"),
    (dict(t1=1.0, adaptive=False), "positive dt0"),
    (dict(t1=1.0, ts=[0.0, 2.0]), r"ts must lie in \[t0, t1\]"),
    (dict(t1=1.0, ts=[0.5, 0.2]), "non-decreasing"),
    (dict(t1=1.0, max_steps=0), "max_steps must be an integer >= 1, got 0"),
])
def test_bad_input_is_rejected_before_compute(kwargs, match):
    t1 = kwargs.pop("t1")
    with pytest.raises(ValueError, match=match):
        solve(oscillator, jnp.array([1.0, 0.0]), t1, **kwargs)


def test_solve_batch_in_padded_chunks_matches_vmap():
    def decay(t, y, k):
        return -k * y

    y0s = jnp.linspace(-1.0, 2.0, 7)[:, None] * jnp.array([1.0, 0.5])
    ts = jnp.linspace(0.0, 1.0, 3)
    whole = jax.vmap(lambda y: solve(decay, y, 1.0, args=0.7, ts=ts))(y0s)
    for chunk in (None, 3, 7, 10):
        traj = solve_batch(decay, y0s, 1.0, chunk_size=chunk, args=0.7, ts=ts)
        np.testing.assert_allclose(traj.ts, ts)
        np.testing.assert_allclose(traj.ys, whole.ys, atol=1e-6)
        np.testing.assert_array_equal(traj.num_steps, whole.num_steps)
        assert traj.ys.shape == (7, 3, 2) and traj.num_rejected.shape == (7,)
    np.testing.assert_allclose(whole.ys[:, -1], y0s * np.exp(-0.7), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(y0=jnp.ones(())), "share a leading batch axis"),
    (dict(y0=(jnp.ones(3), jnp.ones(4))), "share a leading batch axis"),
    (dict(y0=jnp.ones(3), chunk_size=0), "chunk_size=0"),
])
def test_solve_batch_rejects_bad_batches(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_batch(oscillator, t1=1.0, **kwargs)


def test_pi_controller_rejects_fewer_steps_on_a_discontinuous_field():
    """x'' = -sign(x) - 0.1 x': the I controller (SciPy's) keeps overshooting at the kinks."""
    def kinked(t, y, args):
        del t, args
        return jnp.stack([y[1], -jnp.sign(y[0]) - 0.1 * y[1]])

    with jax.enable_x64(True):
        y0 = jnp.array([1.0, 0.0])
        kw = dict(rtol=1e-8, atol=1e-10, solver="dopri5")
        i_ctrl = solve(kinked, y0, 10.0, **kw)
        pi_ctrl = solve(kinked, y0, 10.0, pcoeff=0.2, icoeff=0.3, **kw)
        ref = solve(kinked, y0, 10.0, rtol=1e-13, atol=1e-15, solver="dopri8", max_steps=10**6)
    assert int(pi_ctrl.num_rejected) < int(i_ctrl.num_rejected) / 1.5
    assert (int(pi_ctrl.num_steps) + int(pi_ctrl.num_rejected)
            < int(i_ctrl.num_steps) + int(i_ctrl.num_rejected))
    for traj in (i_ctrl, pi_ctrl):
        np.testing.assert_allclose(traj.ys[-1], ref.ys[-1], atol=1e-4)
