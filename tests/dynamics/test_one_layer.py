"""One-layer nonlinear contrastive dynamics (Tian, ICLR 2023) on a mixture of clusters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.contrastive import energy
from lorank.data import synthetic
from lorank.dynamics import one_layer

K, D, N = 8, 16, 400


def _a_numpy(w, x, xp, act):
    """A(w) for uniform alpha in float64: gate with NumPy, then 2 cov - (1/N) sum dd^T."""
    gates = {
        "linear": lambda z: np.ones_like(z),
        "relu": lambda z: (z > 0).astype(float),
        "leaky_relu": lambda z: np.where(z > 0, 1.0, 0.1),
        "power": lambda z: 3 * z**2,
    }[act]
    xt, xtp = x * gates(x @ w)[:, None], xp * gates(xp @ w)[:, None]
    return 2 * np.cov(xt, rowvar=False) - (xt - xtp).T @ (xt - xtp) / x.shape[0]


@pytest.fixture(scope="module")
def clusters():
    centers = synthetic.simplex_centers(jax.random.key(0), K, D)
    x, x_prime, _ = synthetic.cluster_views(jax.random.key(1), N, centers, scales=jnp.linspace(1.4, 0.8, K))
    data = one_layer.Views(x, x_prime, None)
    x, xp = np.asarray(data.x, np.float64), np.asarray(data.x_prime, np.float64)
    lam = np.linalg.eigvalsh(_a_numpy(np.ones(D), x, xp, "linear"))[-1]
    w0 = one_layer.sphere_init(jax.random.key(2), 64, D)
    finals = {}
    for act in ("linear", "relu"):
        traj = one_layer.simulate(w0, data, act, 200.0 / lam, num_saves=4, rtol=1e-5, atol=1e-7)
        finals[act] = (np.asarray(traj.ys[:, -1], np.float64), np.asarray(traj.ys[:, -2]))
    return dict(data=data, x=x, xp=xp, centers=np.asarray(centers, np.float64), finals=finals)


def test_linear_nodes_all_find_the_top_eigenvector(clusters):
    ws, _ = clusters["finals"]["linear"]
    top = np.linalg.eigh(_a_numpy(np.ones(D), clusters["x"], clusters["xp"], "linear"))[1][:, -1]
    cos = np.abs(ws @ top) / np.linalg.norm(ws, axis=1)
    assert cos.min() > 0.999
    assert one_layer.count_patterns(ws) == 1


def test_relu_nodes_find_more_patterns_as_nodes_grow(clusters):
    ws, _ = clusters["finals"]["relu"]
    counts = [one_layer.count_patterns(ws[:m]) for m in (4, 16, 64)]
    assert counts[0] <= 4 < counts[2]
    assert counts == sorted(counts)
    assert counts[2] >= K - 1, counts
    # every ReLU pattern is a local one: a single cluster center
    cos = np.abs(ws @ clusters["centers"].T) / np.linalg.norm(ws, axis=1, keepdims=True)
    assert cos.max(axis=1).min() > 0.99


@pytest.mark.parametrize("act", ["linear", "relu"])
def test_fixed_points_are_top_eigenvectors_of_a_of_w(clusters, act):
    ws, before = clusters["finals"][act]
    np.testing.assert_allclose(ws, before, atol=1e-3)  # converged
    for w in ws[:16]:
        w = w / np.linalg.norm(w)
        evals, evecs = np.linalg.eigh(_a_numpy(w, clusters["x"], clusters["xp"], act))
        assert abs(evecs[:, -1] @ w) > 0.999
        assert evals[-1] > evals[-2]


@pytest.mark.parametrize("act", ["linear", "relu", "leaky_relu", "power"])
def test_energy_gradient_is_a_of_w_times_w(act):
    """d E_alpha / dw = A(w) w / p with f = h(w^T x) (homogeneity of degree p)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    xp = x + 0.2 * rng.normal(size=(30, 5))
    w = rng.normal(size=5)
    a = one_layer.get_activation(act, slope=0.1, power=3)
    data = one_layer.Views(jnp.asarray(x), jnp.asarray(xp), jnp.ones((30, 30)) / (30 * 29))
    grad = jax.grad(lambda v: energy(a(data.x @ v)[:, None], a(data.x_prime @ v)[:, None],
                                     data.alpha))(jnp.asarray(w))
    want = _a_numpy(w, x, xp, act) @ w / a.degree
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(one_layer.a_matrix(jnp.asarray(w), data, a),
                               _a_numpy(w, x, xp, act), rtol=1e-3, atol=1e-4)
    v = one_layer.field(0.0, jnp.asarray(w), (data, a))
    assert abs(float(jnp.dot(v, jnp.asarray(w)))) < 1e-4 * np.linalg.norm(w) * float(
        jnp.linalg.norm(v))


def test_homogeneity_of_custom_activations():
    assert one_layer.get_activation(lambda z: 2.0 * jnp.maximum(z, 0.0)).degree == pytest.approx(1)
    assert one_layer.get_activation(lambda z: z**3).degree == pytest.approx(3)
    assert one_layer.get_activation("power", power=2).degree == 2


@pytest.mark.parametrize("fn,match", [
    (jnp.tanh, "'tanh' is not positively homogeneous"),
    (jax.nn.softplus, "'softplus' is not positively homogeneous"),
    (lambda z: z + 1.0, "not positively homogeneous"),
    (lambda z: 0.0 * z, "zero on the test grid"),
])
def test_non_homogeneous_activation_is_rejected(fn, match):
    with pytest.raises(ValueError, match=match):
        one_layer.get_activation(fn)


@pytest.mark.parametrize("kwargs,match", [
    (dict(spec="gelu"), "unknown activation 'gelu'"),
    (dict(spec="leaky_relu", slope=1.5), "slope=1.5"),
    (dict(spec="power", power=0), "power=0"),
])
def test_bad_activation_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        one_layer.get_activation(**kwargs)


def test_zero_norm_initial_weight_is_rejected():
    data = one_layer.Views(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((4, 4)))
    w0 = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"rows \[1\] have zero norm"):
        one_layer.simulate(w0, data, "relu", 1.0)
    with pytest.raises(ValueError, match=r"w0 must be \[K, 3\]"):
        one_layer.simulate(jnp.ones((2, 4)), data, "relu", 1.0)


def test_count_patterns_up_to_sign():
    ws = np.array([[1.0, 0.0], [-1.0, 0.01], [0.0, 1.0], [0.7, 0.7]])
    assert one_layer.count_patterns(ws) == 3
    assert one_layer.count_patterns(ws, threshold=0.5) == 2


@pytest.mark.parametrize("act", ["relu", "power"])
@pytest.mark.parametrize("uniform", [True, False])
def test_a_times_w_matches_the_matrix(act, uniform):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 4))
    xp = x + 0.3 * rng.normal(size=(20, 4))
    w = rng.normal(size=4)
    a = one_layer.get_activation(act, power=3)
    alpha = None if uniform else jnp.asarray(rng.uniform(size=(20, 20)))
    data = one_layer.Views(jnp.asarray(x), jnp.asarray(xp), alpha)
    want = (_a_numpy(w, x, xp, act) @ w if uniform
            else np.asarray(one_layer.a_matrix(jnp.asarray(w), data, a), np.float64) @ w)
    np.testing.assert_allclose(one_layer.a_times_w(jnp.asarray(w), data, a), want, rtol=1e-4,
                               atol=1e-4)


def _field_numpy(w, x, xp, act):
    """P_w^perp A(w) w from the NumPy A(w) (uniform alpha), float64."""
    aw = _a_numpy(w, x, xp, act) @ w
    return aw - (w @ aw) / (w @ w) * w


@pytest.mark.parametrize("act", ["linear", "relu", "leaky_relu", "power"])
@pytest.mark.parametrize("uniform", [True, False])
def test_field_batched_equals_vmapped_field(act, uniform):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 6))
    xp = x + 0.3 * rng.normal(size=(40, 6))
    ws = rng.normal(size=(9, 6))
    a = one_layer.get_activation(act, slope=0.1, power=3)
    with jax.enable_x64(True):
        alpha = None if uniform else jnp.asarray(rng.uniform(size=(40, 40)))
        data = one_layer.Views(jnp.asarray(x), jnp.asarray(xp), alpha)
        batched = np.asarray(one_layer.field_batched(0.0, jnp.asarray(ws), (data, a)))
        vmapped = np.asarray(jax.vmap(lambda w: one_layer.field(0.0, w, (data, a)))(
            jnp.asarray(ws)))
    assert batched.dtype == np.float64
    np.testing.assert_allclose(batched, vmapped, rtol=0, atol=1e-13 * np.abs(vmapped).max())
    if uniform:
        want = np.stack([_field_numpy(w, x, xp, act) for w in ws])
        np.testing.assert_allclose(batched, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_simulate_in_chunks_matches_one_vmapped_solve_and_the_plain_field():
    """Chunked solves (a padded last chunk), the batched field for uniform alpha, and
    `field` itself with the same alpha as a matrix give the same ReLU trajectories (the
    chunking does not depend on the activation; the batched field is checked against `field`
    for each activation above). (Each
    evaluates the field with its own float reduction order; at ReLU's kinks such
    differences grow to about 100 rtol, so the solve is tight.)"""
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        centers = synthetic.simplex_centers(jax.random.key(3), 4, 6)
        x, x_prime, _ = synthetic.cluster_views(jax.random.key(4), 60, centers)
        data = one_layer.Views(x, x_prime, None)
        dense = one_layer.Views(data.x, data.x_prime, jnp.full((60, 60), 1.0 / (60 * 59)))
        w0 = jnp.asarray(rng.normal(size=(11, 6)))
        kw = dict(num_saves=5, rtol=1e-11, atol=1e-13, solver="dopri5", pcoeff=0.2, icoeff=0.3)
        whole = one_layer.simulate(w0, data, "relu", 20.0, chunk_size=None, **kw)
        chunked = one_layer.simulate(w0, data, "relu", 20.0, chunk_size=4, **kw)
        plain = one_layer.simulate(w0, dense, "relu", 20.0, chunk_size=None, **kw)
    assert chunked.ys.shape == (11, 5, 6) and chunked.ts.shape == (5,)
    assert chunked.num_steps.shape == chunked.num_rejected.shape == (11,)
    np.testing.assert_allclose(chunked.ys, whole.ys, atol=2e-8)
    np.testing.assert_allclose(plain.ys, whole.ys, atol=2e-8)
    np.testing.assert_allclose(np.linalg.norm(whole.ys[:, -1], axis=1), 1.0, atol=1e-6)
