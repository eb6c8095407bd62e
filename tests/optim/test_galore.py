"""GaLore transformations against a float64 NumPy reference, optax.contrib.galore, and invariants."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank.optim import (MatrixAxes, PROJ_TYPES, ProjectorState, canonical_signs, galore_adafactor, galore_adamw,
                          galore_adamw_8bit, galore_metrics, scale_by_galore)

RANK = 4
SHAPES = {"tall": (24, 10), "wide": (8, 20), "bias": (10,), "small": (3, 5)}


# --------------------------------------------------------------------------- reference (float64 NumPy)


def np_canonical(vectors, axis):
    """Flip each vector (column if axis=0, row if axis=1) so its largest-|.| entry is positive."""
    out = np.array(vectors, dtype=np.float64)
    count = out.shape[1 - axis]
    for j in range(count):
        vec = out[:, j] if axis == 0 else out[j, :]
        if vec[np.argmax(np.abs(vec))] < 0:
            vec *= -1.0
    return out


class NumpyGalore:
    """The reference algorithm (galore-torch's GaLoreProjector + Adam), float64, fixed sign convention."""

    def __init__(self, rank, gap, scale, proj_type, b1=0.9, b2=0.999, eps=1e-8):
        self.rank, self.gap, self.scale, self.proj_type = rank, gap, scale, proj_type
        self.b1, self.b2, self.eps = b1, b2, eps
        self.step, self.ortho, self.m, self.v = 0, {}, {}, {}

    def _svd(self, g):
        u, _, vh = np.linalg.svd(g, full_matrices=False)
        return np_canonical(u[:, :self.rank], 0), np_canonical(vh[:self.rank], 1)

    def _project(self, name, g):
        tall = g.shape[0] >= g.shape[1]
        kind = {"std": "right" if tall else "left", "reverse_std": "left" if tall else "right"}.get(
            self.proj_type, self.proj_type)
        if self.step % self.gap == 0:
            self.ortho[name] = (kind, self._svd(g))
        kind, (p, q) = self.ortho[name]
        if kind == "left":
            return p.T @ g
        if kind == "right":
            return g @ q.T
        return p.T @ g @ q.T

    def _back(self, name, u):
        kind, (p, q) = self.ortho[name]
        if kind == "left":
            out = p @ u
        elif kind == "right":
            out = u @ q
        else:
            out = p @ u @ q
        return out * self.scale

    def update(self, grads):
        t = self.step + 1
        out = {}
        for name, g in grads.items():
            g = np.asarray(g, np.float64)
            projected = g.ndim == 2 and min(g.shape) > self.rank
            low = self._project(name, g) if projected else g
            m = self.b1 * self.m.get(name, 0.0) + (1 - self.b1) * low
            v = self.b2 * self.v.get(name, 0.0) + (1 - self.b2) * low * low
            self.m[name], self.v[name] = m, v
            u = (m / (1 - self.b1**t)) / (np.sqrt(v / (1 - self.b2**t)) + self.eps)
            out[name] = self._back(name, u) if projected else u
        self.step += 1
        return out


def spectral_grads(step, shapes=SHAPES, seed=0):
    """Gradients with singular values 1, 0.7, 0.49, ... (well separated) and fresh vectors each step."""
    rng = np.random.default_rng(seed * 1000 + step)
    out = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            out[name] = rng.normal(size=shape).astype(np.float32)
            continue
        k = min(shape)
        u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
        v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
        out[name] = ((u * 0.7 ** np.arange(k)) @ v.T).astype(np.float32)
    return out


def params_for(shapes=SHAPES):
    return {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# --------------------------------------------------------------------------- agreement with references


# Betas 0.5 and 0.75 make every bias correction 1 - b^t (t <= 10) exact in float32, so the comparison
# measures GaLore alone; with the default 0.9/0.999, float32 Adam's own rounding of 1 - b2^t
# (absolute 6e-8 against 2e-3 at t = 2) is already ~1.5e-5 relative, hence the looser bound there.
# "full": at step 0 the projected [r, r] gradient is diag(S) up to float32 roundoff, and Adam's
# first step (m / sqrt(v) = sign) turns roundoff off-diagonals into +-1 in any float32 code, so eps
# is raised to 0.1 for it, which leaves the other steps' comparison as tight as the one-sided types'.
@pytest.mark.parametrize("proj_type, betas, tol", [(p, (0.5, 0.75), 1e-5) for p in PROJ_TYPES]
                         + [("std", (0.9, 0.999), 3e-5)])
def test_matches_float64_reference_over_refresh_periods(proj_type, betas, tol):
    gap, steps, scale = 3, 10, 0.5  # refreshes at 0, 3, 6, 9: four periods
    eps = 0.1 if proj_type == "full" else 1e-8
    tx = scale_by_galore(RANK, gap, scale, proj_type, inner=optax.scale_by_adam(*betas, eps=eps))
    ref = NumpyGalore(RANK, gap, scale, proj_type, *betas, eps=eps)
    state = tx.init(params_for())
    update = jax.jit(tx.update)
    worst = 0.0
    for step in range(steps):
        grads = spectral_grads(step)
        ours, state = update(jax.tree.map(jnp.asarray, grads), state)
        expected = ref.update(grads)
        for name in SHAPES:
            worst = max(worst, rel_err(ours[name], expected[name]))
    assert worst < tol, (proj_type, worst)


def _canonical_svd(svd):
    """jnp.linalg.svd with our sign convention applied to U's columns and Vh's rows independently."""

    @functools.wraps(svd)
    def wrapped(a, *args, **kwargs):
        u, s, vh = svd(a, *args, **kwargs)
        return canonical_signs(u, axis=0), s, canonical_signs(vh, axis=1)

    return wrapped


def test_matches_optax_contrib_galore_at_reverse_std(monkeypatch):
    # optax.contrib.galore puts the projector on the larger dimension (= reverse_std) and keeps raw
    # SVD signs; both sides get the same sign convention by wrapping the SVD they call.
    monkeypatch.setattr(jax.numpy.linalg, "svd", _canonical_svd(jax.numpy.linalg.svd))
    shapes = {"tall": (24, 10), "wide": (8, 20), "bias": (10,)}
    kwargs = dict(learning_rate=0.01, rank=RANK, update_proj_gap=3, scale=0.5, weight_decay=0.1)
    ours_tx = galore_adamw(**kwargs, proj_type="reverse_std")
    theirs_tx = optax.contrib.galore(**kwargs)
    params = {k: jnp.asarray(v) for k, v in spectral_grads(99, shapes).items()}
    s_ours, s_theirs = ours_tx.init(params), theirs_tx.init(params)
    up_ours, up_theirs = jax.jit(ours_tx.update), jax.jit(theirs_tx.update)
    for step in range(8):
        grads = {k: jnp.asarray(v) for k, v in spectral_grads(step, shapes).items()}
        u1, s_ours = up_ours(grads, s_ours, params)
        u2, s_theirs = up_theirs(grads, s_theirs, params)
        for name in shapes:
            np.testing.assert_allclose(u1[name], u2[name], rtol=1e-6, atol=1e-9, err_msg=f"{step} {name}")


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_low_rank_gradient_passes_unchanged_with_identity_inner(proj_type):
    # A gradient of rank <= r lies in the projector's subspace: P P^T G = G (and G Q^T Q = G).
    rng = np.random.default_rng(1)
    g = {"w": jnp.asarray(rng.normal(size=(20, 3)) @ rng.normal(size=(3, 12)), jnp.float32),
         "small": jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)}  # min dim 4 <= rank: full rank
    tx = scale_by_galore(RANK, 5, 1.0, proj_type, inner=optax.identity())
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(u["w"], g["w"], atol=2e-5)
    np.testing.assert_array_equal(u["small"], g["small"])


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_projectors_are_orthonormal(svd):
    tx = scale_by_galore(RANK, 2, proj_type="full", svd=svd)
    state = tx.init(params_for())
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, spectral_grads(0)), state)
    eye = np.eye(RANK)
    for name in ("tall", "wide"):
        p = state.projectors[name]
        np.testing.assert_allclose(p.left.T @ p.left, eye, atol=1e-5)
        np.testing.assert_allclose(p.right @ p.right.T, eye, atol=1e-5)


def test_refresh_happens_exactly_at_multiples_of_gap():
    gap = 4
    tx = scale_by_galore(RANK, gap)
    state = tx.init(params_for())
    update = jax.jit(tx.update)
    prev = None
    for step in range(13):
        _, state = update(jax.tree.map(jnp.asarray, spectral_grads(step)), state)
        cur = np.asarray(state.projectors["tall"].right)
        if prev is not None:
            changed = not np.array_equal(cur, prev)
            assert changed == (step % gap == 0), step
        prev = cur
    assert int(state.projectors["tall"].refreshes) == 4  # steps 0, 4, 8, 12
    assert int(state.count) == 13


def test_init_under_eval_shape_and_state_shapes():
    tx = galore_adamw(1e-3, RANK, proj_type="std")
    shapes = jax.eval_shape(tx.init, params_for())
    gstate = shapes[0]
    assert gstate.projectors["tall"].right.shape == (RANK, 10)  # 24 x 10: right projector on n
    assert gstate.projectors["wide"].left.shape == (8, RANK)  # 8 x 20: left projector on m
    assert isinstance(gstate.projectors["small"], optax.MaskedNode)
    adam = gstate.inner_state
    assert adam.mu["tall"].shape == (24, RANK) and adam.mu["wide"].shape == (RANK, 20)
    assert adam.nu["small"].shape == (3, 5) and adam.nu["bias"].shape == (10,)


def test_jit_equals_eager():
    tx = galore_adamw(1e-2, RANK, update_proj_gap=2, proj_type="reverse_std", weight_decay=0.1)
    params = params_for()
    s1 = s2 = tx.init(params)
    jitted = jax.jit(tx.update)
    for step in range(2):
        g = jax.tree.map(jnp.asarray, spectral_grads(step))
        u1, s1 = tx.update(g, s1, params)
        u2, s2 = jitted(g, s2, params)
        chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-7)


def _least_squares(tx, steps=300):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 40)), jnp.float32)
    w_true = jnp.asarray(rng.normal(size=(40, 30)) / np.sqrt(40), jnp.float32)
    y = x @ w_true
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)  # noqa: E731
    params = {"w": jnp.zeros((40, 30)), "b": jnp.zeros((30,))}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    first = float(loss(params))
    for _ in range(steps):
        params, state = step(params, state)
    return first, float(loss(params))


LR = optax.cosine_decay_schedule(0.05, 300)


@pytest.mark.parametrize("make", [
    lambda: galore_adamw(LR, rank=8, update_proj_gap=20, scale=1.0),
    lambda: galore_adamw_8bit(LR, rank=8, update_proj_gap=20, scale=1.0, min_size=64, reproject_moments=True),
    lambda: galore_adafactor(LR, rank=8, update_proj_gap=20, scale=1.0, momentum=0.9),
], ids=["adamw", "adamw_8bit", "adafactor"])
def test_converges_on_least_squares(make):
    first, last = _least_squares(make())
    assert last < 1e-3 * first, (first, last)


def test_adafactor_inner_state_is_factored_in_the_subspace():
    params = {"w": jnp.zeros((64, 40)), "b": jnp.zeros((40,))}
    tx = galore_adafactor(1e-2, rank=8, min_dim_size_to_factor=8, momentum=0.9)
    state = jax.eval_shape(tx.init, params)[0]
    factored = state.inner_state[0]
    # std on 64 x 40: right projection, projected gradient [64, 8]: row and column statistics only
    assert sorted([factored.v_row["w"].shape, factored.v_col["w"].shape]) == [(8,), (64,)]
    assert factored.v["w"].shape == (1,)
    assert state.inner_state[-1].trace["w"].shape == (64, 8)


# --------------------------------------------------------------------------- options


def test_bf16_gradient_svd_upcast_and_projector_dtype():
    g32 = jnp.asarray(spectral_grads(0)["tall"])
    g = {"w": g32.astype(jnp.bfloat16)}
    tx = scale_by_galore(RANK, 5, inner=optax.identity())
    state = tx.init({"w": jnp.zeros((24, 10), jnp.bfloat16)})
    u, state = jax.jit(tx.update)(g, state)
    assert state.projectors["w"].right.dtype == jnp.bfloat16 and u["w"].dtype == jnp.bfloat16
    _, _, vh = np.linalg.svd(np.asarray(g["w"], np.float64), full_matrices=False)  # upcast, as GaLore does
    expected = np_canonical(vh[:RANK], 1)
    np.testing.assert_allclose(np.asarray(state.projectors["w"].right, np.float32), expected, atol=1e-2)
    tx32 = scale_by_galore(RANK, 5, projector_dtype=jnp.float32)
    _, s32 = jax.jit(tx32.update)(g, tx32.init({"w": jnp.zeros((24, 10), jnp.bfloat16)}))
    assert s32.projectors["w"].right.dtype == jnp.float32
    np.testing.assert_allclose(s32.projectors["w"].right, expected, atol=1e-5)


def test_nonfinite_gradient_keeps_projector_and_is_reported():
    tx = scale_by_galore(RANK, 2)
    update = jax.jit(tx.update)
    state = tx.init(params_for())
    _, state = update(jax.tree.map(jnp.asarray, spectral_grads(0)), state)
    _, state = update(jax.tree.map(jnp.asarray, spectral_grads(1)), state)
    before = np.asarray(state.projectors["tall"].right)
    bad = spectral_grads(2)
    bad["tall"][0, 0] = np.nan
    _, state = update(jax.tree.map(jnp.asarray, bad), state)  # step 2: refresh due, refused for "tall"
    np.testing.assert_array_equal(state.projectors["tall"].right, before)
    assert np.all(np.isfinite(state.projectors["wide"].left))
    assert int(state.nonfinite) == 1 and int(state.last_nonfinite) == 2
    assert int(galore_metrics(state)["galore/nonfinite_refreshes"]) == 1
    good = spectral_grads(3)
    _, state = update(jax.tree.map(jnp.asarray, good), state)  # retried at the next step
    _, _, vh = np.linalg.svd(good["tall"].astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(state.projectors["tall"].right, np_canonical(vh[:RANK], 1), atol=1e-5)
    assert int(state.projectors["tall"].next_refresh) == 3 + 2


def test_canonical_signs_are_sign_invariant_to_input():
    rng = np.random.default_rng(3)
    u = np.linalg.qr(rng.normal(size=(12, 4)))[0].astype(np.float32)
    flips = np.array([1, -1, -1, 1], np.float32)
    np.testing.assert_array_equal(canonical_signs(jnp.asarray(u), 0),
                                  canonical_signs(jnp.asarray(u * flips), 0))
    np.testing.assert_allclose(canonical_signs(jnp.asarray(u), 0), np_canonical(u, 0), atol=0)


def test_align_signs_makes_vectors_agree_with_previous_projector():
    tx = scale_by_galore(RANK, 1, proj_type="left", align_signs=True, inner=optax.identity())
    state = tx.init({"w": jnp.zeros((24, 10))})
    g = spectral_grads(0)["tall"]
    _, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state)
    old = np.asarray(state.projectors["w"].left)
    # The next gradient has the same singular vectors with some signs flipped and a small perturbation:
    u, s, vh = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    flip = np.ones(10)
    flip[[0, 2]] = -1
    g2 = (u * flip * s) @ vh + 1e-4 * np.random.default_rng(0).normal(size=g.shape)
    _, state = jax.jit(tx.update)({"w": jnp.asarray(g2, jnp.float32)}, state)
    new = np.asarray(state.projectors["w"].left)
    assert np.all(np.sum(new * old, axis=0) > 0.99)


def test_reproject_moments_maps_first_moment_into_new_subspace():
    tx = scale_by_galore(RANK, 1, proj_type="left", reproject_moments=True, inner=optax.scale_by_adam())
    params = {"w": jnp.zeros((24, 10))}
    state = tx.init(params)
    g0, g1 = spectral_grads(0)["tall"], spectral_grads(1)["tall"]
    _, state = jax.jit(tx.update)({"w": jnp.asarray(g0)}, state)
    p0, mu0 = np.asarray(state.projectors["w"].left, np.float64), np.asarray(state.inner_state.mu["w"], np.float64)
    _, state = jax.jit(tx.update)({"w": jnp.asarray(g1)}, state)
    u, _, _ = np.linalg.svd(g1.astype(np.float64), full_matrices=False)
    p1 = np_canonical(u[:, :RANK], 0)
    expected_mu = 0.9 * (p1.T @ p0 @ mu0) + 0.1 * (p1.T @ g1)
    np.testing.assert_allclose(state.inner_state.mu["w"], expected_mu, atol=1e-5)


def test_matrix_axes_for_three_dimensional_leaf_equals_reshaped_matrix():
    rng = np.random.default_rng(2)
    g3 = jnp.asarray(rng.normal(size=(24, 2, 5)), jnp.float32)  # [embed, heads, head_dim]
    tx3 = scale_by_galore(RANK, 3, galore_mask={"w": True}, matrix_axes={"w": MatrixAxes(0, (1, 2))})
    tx2 = scale_by_galore(RANK, 3)
    u3, s3 = jax.jit(tx3.update)({"w": g3}, tx3.init({"w": g3}))
    u2, s2 = jax.jit(tx2.update)({"w": g3.reshape(24, 10)}, tx2.init({"w": g3.reshape(24, 10)}))
    assert u3["w"].shape == (24, 2, 5)
    np.testing.assert_allclose(u3["w"].reshape(24, 10), u2["w"], rtol=1e-6, atol=1e-7)
    # Axes in another order: rows = (heads, head_dim), cols = embed, i.e. the transposed matrix.
    txt = scale_by_galore(RANK, 3, proj_type="left", matrix_axes=MatrixAxes((1, 2), 0))
    ut, _ = jax.jit(txt.update)({"w": g3}, txt.init({"w": g3}))
    txr = scale_by_galore(RANK, 3, proj_type="left")
    ur, _ = jax.jit(txr.update)({"w": g3.reshape(24, 10).T}, txr.init({"w": g3.reshape(24, 10).T}))
    np.testing.assert_allclose(ut["w"].reshape(24, 10).T, ur["w"], rtol=1e-6, atol=1e-7)


def test_adaptive_refresh_lengthens_interval_when_subspace_is_stable():
    tx = scale_by_galore(RANK, 2, lazy_threshold=0.99, lazy_patience=2, max_update_proj_gap=8,
                         inner=optax.identity())
    g = {"w": jnp.asarray(spectral_grads(0)["tall"])}  # the same gradient every step: a stable subspace
    state = tx.init(g)
    update = jax.jit(tx.update)
    refresh_steps = []
    for step in range(40):
        before = int(state.projectors["w"].refreshes)
        _, state = update(g, state)
        if int(state.projectors["w"].refreshes) > before:
            refresh_steps.append(step)
    # step 0 (no previous projector: unstable), 2 (stable, streak 1), 4 (streak 2: gap 2 -> 4),
    # 8 (streak 1), 12 (streak 2: gap -> 8), 20, 28 (gap stays at the cap 8), 36.
    assert refresh_steps == [0, 2, 4, 8, 12, 20, 28, 36]
    # Changing gradients every step: never stable, interval stays at T.
    state = tx.init(g)
    for step in range(7):
        _, state = update({"w": jnp.asarray(spectral_grads(step)["tall"])}, state)
    assert int(state.projectors["w"].refreshes) == 4 and int(state.projectors["w"].gap) == 2


def test_multisteps_counts_optimizer_steps_not_microbatches():
    k, gap = 3, 2
    tx = optax.MultiSteps(galore_adamw(0.1, RANK, update_proj_gap=gap), every_k_schedule=k)
    direct = galore_adamw(0.1, RANK, update_proj_gap=gap)
    params = params_for()
    p_multi, p_direct = params, params
    s_multi, s_direct = tx.init(params), direct.init(params)
    up_multi, up_direct = jax.jit(tx.update), jax.jit(direct.update)
    for opt_step in range(4):
        micro = [spectral_grads(10 * opt_step + j) for j in range(k)]
        for g in micro:
            u, s_multi = up_multi(jax.tree.map(jnp.asarray, g), s_multi, p_multi)
            p_multi = optax.apply_updates(p_multi, u)
        mean = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *micro)
        u, s_direct = up_direct(mean, s_direct, p_direct)
        p_direct = optax.apply_updates(p_direct, u)
    gstate = s_multi.inner_opt_state[0]
    assert int(gstate.count) == 4 and int(gstate.projectors["tall"].refreshes) == 2  # steps 0 and 2
    chex.assert_trees_all_close(p_multi, p_direct, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_with_schedule():
    # rank and update_proj_gap arrive as arrays: rank is read from the state's shapes in update.
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    tx = optax.inject_hyperparams(galore_adamw, static_args=("galore_mask",))(
        learning_rate=schedule, rank=RANK, update_proj_gap=2,
        galore_mask=lambda p: {k: v.ndim == 2 for k, v in p.items()})
    ref = galore_adamw(0.1, RANK, update_proj_gap=2)
    params = params_for()
    state, rstate = tx.init(params), ref.init(params)
    g = jax.tree.map(jnp.asarray, spectral_grads(0))
    update = jax.jit(tx.update)
    u, state = update(g, state, params)
    ur, _ = jax.jit(ref.update)(g, rstate, params)
    # Injected betas are float32 arrays, optax's defaults Python floats: 1 - b2 rounds differently (~1e-5).
    chex.assert_trees_all_close(u, ur, rtol=2e-5, atol=1e-8)  # step 0: schedule value 0.1
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
    assert int(state.inner_state[0].projectors["tall"].refreshes) == 1
    state.hyperparams["scale"] = jnp.asarray(0.0)
    u, state = update(g, state, params)
    assert float(jnp.abs(u["tall"]).max()) == 0.0 and float(jnp.abs(u["bias"]).max()) > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, name", [
    (dict(rank=0), "rank"),
    (dict(rank=-3), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank="8"), "rank"),
    (dict(rank=4, proj_type="diagonal"), "diagonal"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=4, update_proj_gap=-5), "update_proj_gap"),
    (dict(rank=4, svd="lanczos"), "lanczos"),
    (dict(rank=4, lazy_threshold=1.5), "lazy_threshold"),
    (dict(rank=4, scale=float("nan")), "scale"),
    (dict(rank=4, update_proj_gap=10, max_update_proj_gap=5), "max_update_proj_gap"),
])
def test_bad_hyperparameters_raise_naming_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_galore(**kwargs)
    with pytest.raises(ValueError, match=name):
        galore_adamw(1e-3, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-1e-4), "weight_decay"),
])
def test_bad_adam_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        galore_adamw(1e-3, 4, **kwargs)


def test_mask_that_does_not_match_params_raises():
    params = params_for()
    with pytest.raises(ValueError, match="galore_mask"):
        scale_by_galore(RANK, galore_mask={"tall": True, "other": False}).init(params)
    with pytest.raises(ValueError, match="galore_mask"):
        scale_by_galore(RANK, galore_mask=lambda p: [True, False]).init(params)
    with pytest.raises(ValueError, match="bias"):  # selects a vector
        scale_by_galore(RANK, galore_mask={k: True for k in params}).init(params)
    with pytest.raises(ValueError, match="MatrixAxes"):  # 3-D leaf without a matrix view
        scale_by_galore(RANK, galore_mask={"x": True}).init({"x": jnp.zeros((4, 5, 6))})
    with pytest.raises(ValueError, match="axis 3"):
        scale_by_galore(RANK, matrix_axes=MatrixAxes(0, 3)).init({"x": jnp.zeros((4, 5, 6))})


def test_mask_prefix_and_callable_select_leaves():
    params = {"a": {"x": jnp.zeros((12, 10)), "y": jnp.zeros((12, 10))}, "b": jnp.zeros((12, 10))}
    state = scale_by_galore(RANK, galore_mask={"a": True, "b": False}).init(params)
    assert isinstance(state.projectors["b"], optax.MaskedNode)
    assert isinstance(state.projectors["a"]["y"], ProjectorState)
    state = scale_by_galore(RANK, galore_mask=lambda p: jax.tree.map(lambda _: False, p)).init(params)
    assert all(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
        state.projectors, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
