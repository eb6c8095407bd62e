"""Scan&Snap: the synthetic world, the (Y, Z) model, and every statement of the paper checked numerically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.data import synthetic
from lorank.dynamics import scan_snap as ss

KEY = jax.random.key(0)


def single_common_world(num_classes=5, distinct=10):
    """Theorem 2-4's setting: one query shared by every class, one common token."""
    return synthetic.seq_world(1, num_classes, num_common=1, distinct_per_next=distinct)


@pytest.fixture(scope="module")
def flows():
    """Population gradient flow on the single-common-token world for eta_Z / eta_Y in {1, 0.1, 0.01}."""
    world = single_common_world()
    problem = ss.as_problem(world)
    run = ss.RunConfig(steps=4000, mode="population", record_every=40)
    ratios = (1.0, 0.1, 0.01)
    _, rec = ss.sweep(problem, run, jnp.ones(3), jnp.array(ratios), jax.random.split(KEY, 3))
    return world, problem, ratios, rec


# ----- the synthetic world ------------------------------------------------------------------------

def test_generator_layout_and_probabilities():
    w = synthetic.seq_world(3, 2, num_common=4, common_per_query=2, distinct_per_next=5, seq_len=16)
    k, m = 6, 4 + 3 * 2 + 6 * 5 + 3 + 6
    assert w.probs.shape == (k, m) and w.num_classes == k and w.num_tokens == m
    np.testing.assert_array_equal(w.common, np.arange(4))
    np.testing.assert_array_equal(w.query_common.ravel(), np.arange(4, 10))
    np.testing.assert_array_equal(w.distinct.ravel(), np.arange(10, 40))
    np.testing.assert_array_equal(w.query, 40 + np.arange(6) // 2)
    np.testing.assert_array_equal(w.next_token, 43 + np.arange(6))
    for n in range(k):
        q = n // 2
        weights = np.zeros(m)
        weights[:4] = 1.0
        weights[4 + 2 * q: 6 + 2 * q] = 1.0
        weights[10 + 5 * n: 15 + 5 * n] = np.linspace(0.1, 1.0, 5)
        np.testing.assert_allclose(w.probs[n], weights / weights.sum(), rtol=1e-12)
    support = w.probs > 0
    assert support[:, w.common].all()  # common: every class
    assert (support[:, w.distinct.ravel()].sum(0) == 1).all()  # distinct: one class each
    assert (support[:, w.query_common[0]].sum(0) == 2).all()  # per-query common: the query's classes
    assert not support[:, 40:].any()  # queries and next tokens never in the context


def test_sampled_sequences_follow_the_class_probabilities():
    w = synthetic.seq_world(2, 2, num_common=3, distinct_per_next=4, seq_len=64)
    tokens, nxt, classes = synthetic.sample_sequences(KEY, w, 2000)
    tokens, nxt, classes = map(np.asarray, (tokens, nxt, classes))
    assert tokens.shape == (2000, 64) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[:, -1], w.query[classes])
    np.testing.assert_array_equal(nxt, w.next_token[classes])
    counts = np.bincount(classes, minlength=4)
    assert np.all(np.abs(counts / 2000 - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 2000))
    for n in range(4):
        ctx = tokens[classes == n, :-1].ravel()
        freq = np.bincount(ctx, minlength=w.num_tokens) / ctx.size
        sigma = np.sqrt(w.probs[n] * (1 - w.probs[n]) / ctx.size)
        assert np.all(np.abs(freq - w.probs[n]) <= 5 * sigma + 1e-12), n


def test_the_model_s_sampled_batches_follow_the_class_probabilities():
    problem = ss.as_problem(synthetic.seq_world(1, 3, num_common=2, distinct_per_next=3))
    batch = ss.sampled_batch(KEY, problem, 3000, 33)
    counts = np.asarray(batch.weights)
    np.testing.assert_allclose(counts.sum(1), 32)
    classes = np.asarray(batch.target) - np.asarray(problem.next_token)[0]
    for n in range(3):
        freq = counts[classes == n].sum(0) / counts[classes == n].sum()
        p = np.asarray(problem.probs[n], np.float64)
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / counts[classes == n].sum()) + 1e-9)


@pytest.mark.parametrize("bad, match", [
    (dict(num_query=0, next_per_query=2), "num_query"),
    (dict(num_query=1, next_per_query=2, seq_len=1), "seq_len"),
    (dict(num_query=1, next_per_query=2, num_common=0, distinct_per_next=0), "contextual token"),
    (dict(num_query=1, next_per_query=2, distinct_range=(0.0, 1.0)), "distinct_range"),
])
def test_generator_rejects_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        synthetic.seq_world(**bad)


def test_custom_worlds_are_checked():
    w = synthetic.seq_world(1, 2, num_common=1, distinct_per_next=2)
    with pytest.raises(ValueError, match="probability vector"):
        synthetic.check_seq_world(w._replace(probs=w.probs * 1.1))
    with pytest.raises(ValueError, match="fewer than M"):
        synthetic.check_seq_world(w._replace(probs=np.full((4, 4), 0.25)))
    with pytest.raises(ValueError, match="seq_len"):
        synthetic.check_seq_world(w._replace(seq_len=1))
    with pytest.raises(ValueError, match="fewer than M"):
        ss.as_problem(w._replace(probs=np.full((4, 4), 0.25)))
    with pytest.raises(ValueError, match="probability vector"):
        ss.as_problem(w._replace(probs=w.probs * 0.5))


@pytest.mark.parametrize("name, value", [("eta_y", 0.0), ("eta_z", -1.0)])
def test_non_positive_learning_rates_are_rejected(name, value):
    problem = ss.as_problem(single_common_world())
    rates = dict(eta_y=1.0, eta_z=1.0) | {name: value}
    with pytest.raises(ValueError, match=name):
        ss.run_one(problem, ss.RunConfig(steps=2), rates["eta_y"], rates["eta_z"], KEY)


def test_bad_run_settings_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        ss.check_run(ss.RunConfig(steps=2, mode="exact"))
    with pytest.raises(ValueError, match="record_every"):
        ss.check_run(ss.RunConfig(steps=5, record_every=2))
    with pytest.raises(ValueError, match="seq_len"):
        ss.check_run(ss.RunConfig(steps=2, seq_len=1))


# ----- the model ----------------------------------------------------------------------------------

def reference_loss(y, z, tokens, targets, residual):
    """Position-wise attention in float64: softmax over the first T - 1 positions, l2 norm, CE."""
    y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
    total = 0.0
    for seq, target in zip(np.asarray(tokens), np.asarray(targets)):
        m, ctx = seq[-1], seq[:-1]
        b = np.exp(z[m, ctx] - z[m, ctx].max())
        b /= b.sum()
        u = np.zeros(len(y))
        np.add.at(u, ctx, b)
        if residual:
            u[m] += 1.0
        logits = (u / np.linalg.norm(u)) @ y
        total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target]
    return total / len(tokens)


@pytest.mark.parametrize("residual", [False, True])
def test_token_count_attention_equals_position_wise_attention(residual):
    w = synthetic.seq_world(2, 2, num_common=3, distinct_per_next=3, seq_len=12)
    k1, k2, k3 = jax.random.split(KEY, 3)
    m = w.num_tokens
    params = ss.Params(jax.random.normal(k1, (m, m)), jax.random.normal(k2, (m, m)))
    tokens, nxt, _ = synthetic.sample_sequences(k3, w, 6)
    got = ss.loss(params, ss.batch_from_tokens(tokens, nxt, m), residual)
    np.testing.assert_allclose(float(got), reference_loss(params.y, params.z, tokens, nxt, residual), rtol=1e-5)


def test_padded_problems_train_exactly_like_the_originals():
    small = ss.as_problem(synthetic.seq_world(1, 2, num_common=2, distinct_per_next=3))
    large = ss.as_problem(synthetic.seq_world(3, 2, num_common=2, distinct_per_next=3))
    stacked = ss.stack_problems([small, large])
    run = ss.RunConfig(steps=20, mode="sampled", batch_size=8, seq_len=16, momentum=0.9, record_every=10)
    _, alone = ss.run_one(small, run, 2.0, 1.0, KEY)
    _, padded = ss.sweep(stacked, run, jnp.array([2.0, 2.0]), jnp.array([1.0, 1.0]),
                         jnp.stack([KEY, KEY]), stacked=True)
    m = small.probs.shape[1]
    np.testing.assert_allclose(padded.loss[0], alone.loss, rtol=1e-5)
    np.testing.assert_allclose(padded.z_query[0, :, :2, :m], alone.z_query, atol=1e-5)


# ----- Lemma 1 ------------------------------------------------------------------------------------

def test_lemma1_rows_of_y_and_z_sum_to_zero_and_only_query_rows_of_z_move():
    w = synthetic.seq_world(2, 2, num_common=3, distinct_per_next=4, seq_len=32)
    problem = ss.as_problem(w)
    run = ss.RunConfig(steps=60, mode="sampled", batch_size=16, seq_len=32, momentum=0.9, record_every=20,
                       record_y=True)
    params, rec = ss.run_one(problem, run, 1.0, 1.0, KEY)
    scale_y = float(jnp.abs(rec.y).max())
    scale_z = float(jnp.abs(params.z).max())
    assert scale_y > 0.1 and scale_z > 0.01  # both moved
    np.testing.assert_allclose(rec.y.sum(-1), 0.0, atol=1e-5 * scale_y)
    np.testing.assert_allclose(params.z.sum(-1), 0.0, atol=1e-5 * scale_z)
    others = np.setdiff1d(np.arange(w.num_tokens), w.query)
    assert float(jnp.abs(params.z[others]).max()) == 0.0


# ----- Lemmas 5 and 6 -----------------------------------------------------------------------------

@pytest.mark.parametrize("eta_y", [0.5, 4.0])
def test_lemma5_decoder_recursion_matches_the_simulation(eta_y):
    """No common token: the f_n are orthonormal and Z never moves; Y^T f_n = h*(s) (M e_n - 1)."""
    w = synthetic.seq_world(1, 3, num_common=0, distinct_per_next=5)
    problem = ss.as_problem(w)
    k, m = w.probs.shape
    run = ss.RunConfig(steps=60, mode="one_class", record_every=k, record_y=True)
    _, rec = ss.run_one(problem, run, eta_y, 1.0, KEY)
    _, f = ss.class_trajectory(rec, problem)
    got = np.asarray(jnp.einsum("sij,ski->skj", rec.y, f), np.float64)
    h = ss.h_recursion(run.steps // k, eta_y, m)
    want = h[:, None, None] * (m * np.eye(m)[w.next_token][None] - 1.0)
    np.testing.assert_allclose(got, want, atol=2e-6 * max(1.0, np.abs(want).max()))
    assert h[-1] > 0.1  # the decoder moved well away from 0


@pytest.mark.parametrize("m, eta_y", [(10, 0.1), (10, 20.0), (100, 1.0), (1000, 5.0)])
def test_lemma6_continuous_h_solves_its_equation_and_stays_within_2eta_over_m(m, eta_y):
    s = np.arange(20001)
    h = ss.h_continuous(s, eta_y, m)
    np.testing.assert_allclose(np.exp(m * h) + (m - 1) * m * h, m * eta_y * s + 1.0, rtol=1e-12)
    gap = ss.h_recursion(len(s) - 1, eta_y, m) - h
    assert gap.min() >= -1e-12  # the recursion (forward Euler on a decreasing rate) runs ahead
    assert gap.max() <= 2 * eta_y / m


# ----- Theorem 2 ----------------------------------------------------------------------------------

def test_theorem2_distinct_tokens_gain_and_the_common_token_loses(flows):
    world, _, ratios, rec = flows
    dz = np.diff(np.asarray(rec.z_query[:, :, 0]), axis=1)  # [runs, saves - 1, M] (class 0's query)
    distinct = world.distinct.ravel()
    assert (dz[:, :, distinct] > 0).all()
    assert (dz[:, :, world.common] < 0).all()


def test_theorem2_rate_over_f_squared_is_shared_by_the_distinct_tokens_of_a_class(flows):
    """dz_ml / f_nl^2 is the same for every distinct l of n in the limit eta_Z / eta_Y -> 0."""
    _, _, ratios, rec = flows
    spread = np.asarray(rec.xi_spread[:, 1:]).max(axis=(1, 2))  # worst over time and classes, per run
    assert spread[0] > spread[1] > spread[2]
    assert spread[2] < 0.05


# ----- Theorem 3 ----------------------------------------------------------------------------------

def test_theorem3_relative_gain_is_r0_times_chi(flows):
    world, problem, ratios, rec = flows
    errors = []
    for run in range(len(ratios)):
        one = jax.tree.map(lambda a, i=run: a[i], rec)
        _, f = ss.class_trajectory(one, problem)
        ref, others = world.distinct[0, 0], world.distinct[0, 1:]
        r = np.stack([np.asarray(ss.relative_gain(f[:, 0], tok, ref)) for tok in others], -1)  # [S, D - 1]
        pred = r[0] * np.asarray(ss.chi(one.z_query[:, 0]))[:, others]
        errors.append(np.abs(r - pred).max() / np.abs(r).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_theorem3_dominant_token_bounds(flows):
    """exp(2 f_nl0^2(0) B_n) <= chi_l0 <= exp(2 B_n) for the most probable distinct token l0."""
    world, problem, ratios, rec = flows
    one = jax.tree.map(lambda a: a[-1], rec)
    _, f = ss.class_trajectory(one, problem)
    for n in range(world.num_classes):
        l0 = world.distinct[n, -1]
        chi = np.asarray(ss.chi(one.z_query[:, n]))[:, l0]
        b = np.asarray(one.b[:, n])
        assert b[-1] > 0
        lower, upper = np.exp(2 * float(f[0, n, l0]) ** 2 * b), np.exp(2 * b)
        slack = 1e-3 * (upper - 1)
        assert np.all(lower - slack <= chi) and np.all(chi <= upper + slack)


# ----- Theorem 4 ----------------------------------------------------------------------------------

def test_theorem4_learning_rates_control_b():
    """Larger eta_Z at a fixed eta_Y / eta_Z: larger B_n (sparser attention); larger eta_Y at a fixed eta_Z:
    smaller B_n (denser). The closed form's own numbers are compared with the simulation in docs/scan_snap.md."""
    world = single_common_world()
    problem = ss.as_problem(world)
    run = ss.RunConfig(steps=3000, mode="population", record_every=3000)
    eta_y = jnp.array([0.5, 1.0, 2.0, 2.0, 8.0])
    eta_z = jnp.array([0.5, 1.0, 2.0, 0.5, 0.5])
    _, rec = ss.sweep(problem, run, eta_y, eta_z, jax.random.split(KEY, 5))
    b = np.asarray(rec.b[:, -1]).mean(1)
    assert b[0] < b[1] < b[2]  # eta_Z up, ratio 1
    assert b[3] > b[4]  # eta_Y up, eta_Z = 0.5
    closed = [ss.b_closed_form(3000, float(ey), float(ez), 5, 57, 1.0) for ey, ez in zip(eta_y, eta_z)]
    assert closed[0] < closed[1] < closed[2] and closed[3] > closed[4]  # the closed form orders them alike


def test_closed_forms_reject_bad_input():
    with pytest.raises(ValueError, match="eta_y"):
        ss.h_recursion(3, 0.0, 10)
    with pytest.raises(ValueError, match="num_tokens"):
        ss.h_continuous(1.0, 1.0, 1)
    with pytest.raises(ValueError, match="t must be"):
        ss.h_continuous(-1.0, 1.0, 10)


def test_chunked_sweeps_equal_one_vmap():
    problem = ss.as_problem(single_common_world(3, 4))
    run = ss.RunConfig(steps=6, mode="sampled", batch_size=4, seq_len=8, momentum=0.9, record_every=3)
    args = (jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 1.0, 1.5]), jax.random.split(KEY, 3))
    _, whole = ss.sweep(problem, run, *args)
    _, chunked = ss.sweep(problem, run, *args, chunk_size=2)
    np.testing.assert_allclose(chunked.z_query, whole.z_query, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked.loss, whole.loss, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        ss.sweep(problem, run, *args, chunk_size=0)
