"""The L_{phi,psi} family: hand-computed values, a float64 loop reference, NT-Xent, invariances, gradients,
and the coordinate-wise statement (each loss's gradient is that of -E_alpha at its min-player's alpha)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lorank import contrastive as C

HYPER = {"tau": 0.7, "eps": 0.3, "c": 1.5}


def _views(seed, n=3, d=4, noise=0.4):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d))
    return z1, z1 + noise * rng.normal(size=(n, d))


def _phi_psi_numpy(name, tau, eps, c):
    return {
        "infonce": (lambda x: tau * np.log(eps + x), lambda x: np.exp(x / tau)),
        "mine": (np.log, np.exp),
        "triplet": (lambda x: x, lambda x: max(x + eps, 0.0)),
        "soft_triplet": (lambda x: tau * np.log(1 + x), lambda x: np.exp(x / tau + eps)),
        "tuplet": (lambda x: np.log(1 + x), np.exp),
        "lifted": (lambda x: max(np.log(x), 0.0) ** 2, lambda x: np.exp(x + eps)),
        "coria": (lambda x: x, lambda x: 1 / (1 + np.exp(-c * x))),
        "ji": (lambda x: x, lambda x: x),
    }[name]


def _loop_loss(name, z1, z2, *, tau, eps, c, normalize=True, negatives="both_views"):
    """The family's definition one anchor at a time, in float64."""
    f = np.concatenate([z1, z2]).astype(np.float64)
    if normalize:
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n = len(z1)
    phi, psi = _phi_psi_numpy(name, tau, eps, c)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        d_i = np.sum((f[i] - f[partner]) ** 2) / 2
        xi = 0.0
        for j in range(2 * n):
            if j % n == i % n or (negatives == "one_view" and j // n != i // n):
                continue
            xi += psi(d_i - np.sum((f[i] - f[j]) ** 2) / 2)
        total += phi(xi)
    return total / (2 * n)


def test_hand_computed_three_sample_batch():
    # Unit vectors e1, e2, -e1 seen identically in both views: d_i^2 = 0; d^2 = 1 - cos is 1 between
    # e1 and e2 or e2 and -e1, and 2 between e1 and -e1. Anchors 0 and 2 see negatives at 1, 2, 1, 2;
    # anchor 1 at 1, 1, 1, 1 (both views), each anchor twice (once per view).
    z = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    e = math.e
    expected = {
        ("ji", ()): (2 * -6 + -4) / 3,
        ("triplet", (("eps", 1.5),)): (1 + 2 + 1) / 3,  # [x + 1.5]_+ is 0.5 at x = -1, 0 at x = -2
        ("infonce", (("tau", 1.0), ("eps", 1.0))): (2 * math.log(1 + 2 / e + 2 / e ** 2) + math.log(1 + 4 / e)) / 3,
        ("mine", ()): (2 * math.log(2 / e + 2 / e ** 2) + math.log(4 / e)) / 3,
        ("tuplet", ()): (2 * math.log(1 + 2 / e + 2 / e ** 2) + math.log(1 + 4 / e)) / 3,
        ("coria", (("c", 1.0),)): (2 * (2 / (1 + e) + 2 / (1 + e ** 2)) + 4 / (1 + e)) / 3,
    }
    for (name, hyper), value in expected.items():
        got = float(C.family_loss(name, z, z, **dict(hyper)))
        assert got == pytest.approx(value, rel=1e-5), name
    # one view only: anchor 0 sees e2 (1) and -e1 (2); anchor 1 sees e1, -e1 (1, 1); anchor 2 like anchor 0
    assert float(C.family_loss("ji", z, z, negatives="one_view")) == pytest.approx((2 * -3 + -2) / 3, rel=1e-6)


@pytest.mark.parametrize("name", C.FAMILY_NAMES)
@pytest.mark.parametrize("normalize, negatives", [(True, "both_views"), (False, "one_view")])
def test_every_loss_matches_its_definition(name, normalize, negatives):
    z1, z2 = _views(0)
    scale = 1.0 if normalize else 0.3  # raw embeddings: keep exp(x) and log(x) moderate
    z1, z2 = scale * z1, scale * z2
    got = float(C.family_loss(name, jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), normalize=normalize,
                              negatives=negatives, **HYPER))
    want = _loop_loss(name, z1, z2, normalize=normalize, negatives=negatives, **HYPER)
    assert got == pytest.approx(want, rel=2e-5, abs=2e-6)


def test_infonce_with_eps_one_is_tau_times_nt_xent():
    z1, z2 = _views(1, n=6, d=5)
    tau = 0.2
    f = np.concatenate([z1, z2])
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T / tau
    n = len(z1)
    nt_xent = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        logits = [sim[i, partner]] + [sim[i, j] for j in range(2 * n) if j != i and j != partner]
        nt_xent += -(logits[0] - np.log(np.sum(np.exp(logits))))
    nt_xent /= 2 * n
    got = float(C.family_loss("infonce", jnp.asarray(z1), jnp.asarray(z2), tau=tau, eps=1.0))
    assert got == pytest.approx(tau * nt_xent, rel=1e-5)
    assert float(C.family_loss("infonce", jnp.asarray(z1), jnp.asarray(z2), tau=tau)) == pytest.approx(got)


def test_large_similarities_over_tau_do_not_overflow():
    z1, z2 = _views(2, n=8)
    for name in ("infonce", "mine", "soft_triplet", "tuplet", "lifted"):
        value = C.family_loss(name, jnp.asarray(z1) * 50, jnp.asarray(z2) * 50, tau=0.01, normalize=False)
        assert np.isfinite(float(value)), name


@pytest.mark.parametrize("name", C.LOSS_NAMES)
def test_invariant_to_permuting_the_batch_and_swapping_the_views(name):
    z1, z2 = _views(3, n=7)
    perm = np.random.default_rng(0).permutation(7)
    base = float(C.contrastive_loss(name, jnp.asarray(z1), jnp.asarray(z2)))
    assert float(C.contrastive_loss(name, jnp.asarray(z1[perm]), jnp.asarray(z2[perm]))) == pytest.approx(
        base, rel=1e-5, abs=1e-6)
    assert float(C.contrastive_loss(name, jnp.asarray(z2), jnp.asarray(z1))) == pytest.approx(base, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", C.FAMILY_NAMES)
def test_gradients_match_finite_differences(name):
    z1, z2 = (jnp.asarray(z, jnp.float32) for z in _views(4, n=4, d=3))
    check_grads(lambda a, b: C.family_loss(name, a, b, **HYPER), (z1, z2), order=1, modes=("rev",),
                atol=5e-2, rtol=5e-2, eps=1e-2)


def _network(theta, x):
    """A tiny network upstream of the embeddings: tanh(x W1) W2. x [N, 5] -> [N, 3]."""
    return jnp.tanh(x @ theta["w1"]) @ theta["w2"]


@pytest.mark.parametrize("name", C.FAMILY_NAMES)
def test_coordinate_wise_gradient_is_the_energy_gradient_at_the_min_players_alpha(name):
    rng = np.random.default_rng(5)
    theta = {"w1": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
             "w2": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    x1 = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    x2 = x1 + 0.3 * jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)

    def loss(t):
        return C.family_loss(name, _network(t, x1), _network(t, x2), **HYPER)

    alpha = C.min_player_weights(name, _network(theta, x1), _network(theta, x2), **HYPER)
    assert float(jnp.min(alpha)) >= 0.0

    def neg_energy(t):  # -E_alpha / 2N with alpha held at the min-player's
        return -C.two_view_energy(_network(t, x1), _network(t, x2), alpha)

    g_loss, g_energy = jax.grad(loss)(theta), jax.grad(neg_energy)(theta)
    for key in theta:
        np.testing.assert_allclose(g_loss[key], g_energy[key], rtol=2e-4, atol=2e-6)


def test_infonce_min_player_is_r_h_with_mass_xi_over_eps_plus_xi():
    z1, z2 = _views(6, n=5)
    tau, eps = 0.4, 0.7
    alpha = np.asarray(C.min_player_weights("infonce", jnp.asarray(z1), jnp.asarray(z2), tau=tau, eps=eps))
    f = np.concatenate([z1, z2])
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n = len(z1)
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        neg = [j for j in range(2 * n) if j % n != i % n]
        d = np.array([np.sum((f[i] - f[j]) ** 2) / 2 for j in neg])
        d_i = np.sum((f[i] - f[partner]) ** 2) / 2
        xi = np.sum(np.exp((d_i - d) / tau))
        want = xi / (eps + xi) * np.exp(-d / tau) / np.sum(np.exp(-d / tau))  # tau^-1 xi phi'(xi) softmax
        np.testing.assert_allclose(alpha[i, neg], want, rtol=2e-5, atol=1e-7)
        assert np.all(alpha[i, [j for j in range(2 * n) if j % n == i % n]] == 0)
    r_h = C.pair_weights("r_H", jnp.asarray(z1), jnp.asarray(z2), tau=tau, eps=eps)
    np.testing.assert_allclose(r_h, alpha, rtol=2e-5, atol=1e-7)


def test_global_batch_under_a_data_parallel_mesh():
    """8 devices holding 2 samples each give the one-device loss of all 16: negatives come from every device."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    z1, z2 = (jnp.asarray(z, jnp.float32) for z in _views(7, n=16, d=4))
    for name in ("infonce", "r_s", "backprop"):
        fn = jax.jit(lambda a, b, name=name: C.contrastive_loss(name, a, b))
        sharded = float(fn(jax.device_put(z1, sharding), jax.device_put(z2, sharding)))
        one = float(C.contrastive_loss(name, z1, z2))
        assert sharded == pytest.approx(one, rel=1e-5, abs=1e-6), name
        per_device = np.mean([float(C.contrastive_loss(name, z1[k:k + 2], z2[k:k + 2])) for k in range(0, 16, 2)])
        assert abs(per_device - one) > 1e-3, name  # a device-local loss would be a different number


def test_directclr_is_infonce_on_the_first_d0_dimensions():
    h1, h2 = (jnp.asarray(z) for z in _views(8, n=5, d=6))
    got = float(C.directclr_loss(h1, h2, d0=2, tau=0.3))
    want = _loop_loss("infonce", np.asarray(h1[:, :2]), np.asarray(h2[:, :2]), tau=0.3, eps=1.0, c=1.0)
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="d0"):
        C.directclr_loss(h1, h2, d0=7)
    with pytest.raises(ValueError, match="d0"):
        C.directclr_loss(h1, h2, d0=0)


@pytest.mark.parametrize("name, hyper, match", [
    ("nce", {}, "unknown contrastive loss 'nce'"),
    ("infonce", {"tau": 0.0}, "tau must be"),
    ("infonce", {"tau": -1.0}, "tau must be"),
    ("infonce", {"eps": -0.5}, "eps must be"),
    ("direct", {"p": 1.0}, "p must be"),
    ("r_gamma", {"gamma": 1.0}, "gamma must be"),
    ("r_H", {"temperature": 0.5}, "unknown hyperparameter"),
    ("infonce", {"negatives": "all"}, "negatives must be"),
    ("coria", {"c": 0.0}, "c must be"),
])
def test_bad_hyperparameters_are_refused_naming_them(name, hyper, match):
    with pytest.raises(ValueError, match=match):
        C.check_loss(name, **hyper)
    z = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=match):
        C.contrastive_loss(name, z, z + 1, **hyper)


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        C.contrastive_loss("infonce", jnp.ones((1, 3)), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="same shape"):
        C.contrastive_loss("r_H", jnp.ones((4, 3)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        C.contrastive_loss("infonce", jnp.ones((4,)), jnp.ones((4,)))
